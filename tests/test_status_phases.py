"""`mt status --phases` (text and --json) from the records the job wrapper wrote.

The real CLI reads a real registry; the records are written as a job wrapper writes them
(a final state, so no scheduler is asked about them). The Slurm test with real jobs is
tests/test_slurm_staging.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from mtcli import mt
from pydantic import SecretStr

from hpc.phases import Phases
from hpc.registry import Record, Registry

pytestmark = pytest.mark.timeout(60)


def _write(job_id: str, phases: Phases | None) -> Record:
    record = Record(
        backend="local",
        job_id=job_id,
        nonce=job_id,
        model="gemma",
        engine="llamacpp",
        state="failed",
        reason="engine exited",
        api_key=SecretStr("mtj-secret"),
        phases=phases,
    )
    Registry(Path(os.environ["MT_HOME"]) / "registry").write(record)
    return record


def test_status_phases_shows_each_phase_and_why_weights_were_not_staged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "240")
    copied = _write(
        "j1",
        Phases(
            queued_s=12.0,
            staging_s=2.5,
            staging_bytes=500_000_000,
            staging_mb_s=200.0,
            staged_path="/tmp/mt-staging-0/entries/k/w.gguf",
            engine_start_to_healthy_s=7.25,
        ),
    )
    skipped = _write(
        "j2", Phases(staging_s=0.0, staging_bytes=0, staging_note="weights 'org/m' are no path")
    )
    none = _write("j3", None)
    rows = json.loads(mt("status", "--phases", "--json").stdout)
    by_key = {row["key"]: row for row in rows}
    assert set(by_key) == {copied.key, skipped.key, none.key}
    assert by_key[copied.key]["phases"]["staging_mb_s"] == 200.0
    assert by_key[copied.key]["queued_s"] == 12.0
    assert by_key[none.key]["phases"] is None
    assert "mtj-secret" not in json.dumps(rows)
    text = " ".join(mt("status", "--phases").stdout.split())
    assert "12.0s 2.5s (500.0 MB, 200 MB/s) 7.2s" in text
    assert "not staged: weights 'org/m' are no path" in text
