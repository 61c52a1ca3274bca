"""`mt status --phases` (text and --json) from the records the job wrapper wrote.

The real CLI reads a real registry; the records are written as a job wrapper writes them
(a final state, so no scheduler is asked about them). The Slurm test with real jobs is
tests/test_slurm_staging.py. The first-token phase is also measured on the session's real
llama-server job (tests/realengine.py).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from mtcli import mt
from pydantic import SecretStr
from realengine import RealEngine

from hpc import tlspin
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


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
def test_a_real_jobs_first_answer_becomes_its_first_token_phase(real_engine: RealEngine) -> None:
    conn = tlspin.connection(real_engine.base_url, real_engine.tls_sha256, timeout=60)
    try:
        body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 2})
        headers = {"Authorization": f"Bearer {real_engine.key}", "Content-Type": "application/json"}
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()
    deadline = time.monotonic() + 30  # the wrapper writes it within its next loop (0.2 s)
    while (phases := real_engine.current().phases) is None or phases.first_token_s is None:
        assert time.monotonic() < deadline, f"no first_token_s in {phases}"
        time.sleep(0.1)
    assert phases.first_token_s > 0
    assert phases.engine_start_to_healthy_s is not None  # written at ready, still there
