"""On demand with the local backend and the real Gemma model: `mt gateway --backend local`
starts the job wrapper itself on the first request, relays the answer, cancels the job
when idle, and a restarted gateway still knows (from the registry) which job is its own."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
from mtcli import GEMMA, engine_processes, gemma_models_yaml, mt, owner_key, running_gateway

from bench.ondemand_coldstart import stream_request
from hpc.registry import Record, Registry

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


def _records() -> list[Record]:
    return Registry(Path(os.environ["MT_HOME"]) / "registry").records()


def _stream(url: str) -> str:
    request = stream_request(url, owner_key(), GEMMA)
    with urllib.request.urlopen(request, timeout=240) as response:  # noqa: S310
        assert response.status == 200
        return str(response.read().decode())


def test_local_job_starts_on_request_and_is_cancelled_when_idle_even_after_a_restart(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = gemma_models_yaml(
        tmp_path / "models.yaml",
        gemma_gguf,
        extra="    on_demand: {idle_ttl_s: 4, start_deadline_s: 200}\n",
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    try:
        with running_gateway("--backend", "local") as url:
            text = _stream(url)
        # The wait was shown as SSE comments, then the engine's stream in the same response.
        comments = [line for line in text.splitlines() if line.startswith(": ")]
        assert comments and comments[0] == ": submitting", text
        data = [line for line in text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        content = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            for line in data[:-1]
            if json.loads(line[6:]).get("choices")
        )
        assert content.strip(), text
        [record] = _records()
        assert record.state == "ready" and record.started_by is not None
        assert engine_processes(record.engine_pid)

        # The first gateway stopped before the job was idle; a new one adopts and cancels it.
        state_file = Path(os.environ["MT_HOME"]) / "ondemand-state.json"
        with running_gateway("--backend", "local"):
            deadline = time.monotonic() + 60
            while json.loads(state_file.read_text())["models"][GEMMA]["state"] != "idle":
                assert time.monotonic() < deadline, "the restarted gateway never cancelled"
                time.sleep(0.5)
        assert _records()[0].state == "gone"
        assert engine_processes(record.engine_pid) == []
        assert json.loads(state_file.read_text())["backend"] == "local"
    finally:
        for leftover in _records():
            if leftover.state not in ("gone", "failed"):
                mt("cancel", leftover.key, check=False)
