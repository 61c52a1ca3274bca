"""End to end on the real engine: mt submit → ready → gateway → openai client → mt cancel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

MODEL = "gemma-3-270m"


def mt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess with the test's environment (MT_HOME is private)."""
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=240,
    )


@pytest.fixture
def models_yaml(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gemma_gguf))}}}\n"
        '    engine_args: ["--chat_format", "alpaca", "--n_ctx", "1024"]\n'
        "    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


@pytest.fixture
def gateway_url(models_yaml: Path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", "gateway", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line + (proc.stderr.read() if proc.stderr else "")
        yield line.split("listening on", 1)[1].strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


def engine_processes(port: int) -> list[psutil.Process]:
    """This job's engine: llama_cpp.server listening on the record's port."""
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "llama_cpp.server" in cmdline and str(port) in cmdline:
            out.append(proc)
    return out


def test_submit_stream_through_gateway_and_cancel(models_yaml: Path, gateway_url: str) -> None:
    import openai

    submitted = mt("submit", MODEL, "--wait", "--json")
    record = json.loads(submitted.stdout)
    assert record["state"] == "ready"
    assert record["base_url"].startswith("http://127.0.0.1:")
    assert "api_key" not in record  # --json output never carries the per-job key
    job = record["key"]

    status = json.loads(mt("status", "--json").stdout)
    assert [(r["key"], r["state"]) for r in status] == [(job, "ready")]

    # The gateway's reload loop picks the ready record up within its interval.
    client = openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused-without-keys-file")
    deadline = time.monotonic() + 10
    while MODEL not in [m.id for m in client.models.list().data]:
        assert time.monotonic() < deadline, "the gateway never listed the ready model"
        time.sleep(0.2)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1, pieces  # streamed in several chunks
    assert "".join(pieces).strip()

    # The engine itself refuses requests without the per-job key: only the gateway has it.
    direct = openai.OpenAI(base_url=record["base_url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        direct.models.list()

    assert engine_processes(record["port"]), "expected a running engine before cancel"
    cancelled = json.loads(mt("cancel", job, "--json").stdout)
    assert cancelled["state"] == "gone"
    assert engine_processes(record["port"]) == []
    stored = json.loads((Path(os.environ["MT_HOME"]) / "registry" / f"{job}.json").read_text())
    assert stored["state"] == "gone"

    deadline = time.monotonic() + 10
    while MODEL in [m.id for m in client.models.list().data]:
        assert time.monotonic() < deadline, "the gateway kept listing a gone job"
        time.sleep(0.2)
