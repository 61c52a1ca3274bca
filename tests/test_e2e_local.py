"""End to end on the real engine: mt submit → ready → gateway → openai client → mt cancel."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import psutil
import pytest
import tmpfs
from jobclient import pinned_openai
from mtcli import GEMMA, engine_processes, gemma_models_yaml, mt, owner_key, running_gateway

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


def test_submit_stream_through_gateway_and_cancel(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    with running_gateway() as gateway_url:
        submitted = mt("submit", GEMMA, "--wait", "--json")
        record = json.loads(submitted.stdout)
        assert record["state"] == "ready"
        assert record["base_url"].startswith("https://127.0.0.1:")
        assert "api_key" not in record  # --json output never carries the per-job key
        job = record["key"]

        status = json.loads(mt("status", "--json").stdout)
        assert [(r["key"], r["state"]) for r in status] == [(job, "ready")]

        # The gateway's reload loop picks the ready record up within its interval.
        client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=owner_key())
        deadline = time.monotonic() + 10
        while GEMMA not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the gateway never listed the ready model"
            time.sleep(0.2)

        stream = client.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1, pieces  # streamed in several chunks
        assert "".join(pieces).strip()

        # The job's front refuses requests without the per-job key: only the gateway has it.
        direct = pinned_openai(record["base_url"], record["tls_sha256"], "wrong")
        with pytest.raises(openai.AuthenticationError):
            direct.models.list()

        assert engine_processes(record["engine_pid"]), "expected a running engine before cancel"
        cancelled = json.loads(mt("cancel", job, "--json").stdout)
        assert cancelled["state"] == "gone"
        assert engine_processes(record["engine_pid"]) == []
        stored = json.loads((Path(os.environ["MT_HOME"]) / "registry" / f"{job}.json").read_text())
        assert stored["state"] == "gone"

        deadline = time.monotonic() + 10
        while GEMMA in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the gateway kept listing a gone job"
            time.sleep(0.2)


# Another login node that shares $HOME: the same files, another host name and other
# processes (UTS and PID namespaces), where the job's pids mean nothing.
_OTHER_HOST = "other-login-node"
_ON_OTHER_HOST = (
    "unshare",
    "--uts",
    "--pid",
    "--fork",
    "--mount-proc",
    "sh",
    "-c",
    f'hostname {_OTHER_HOST} && exec "$@"',
    "sh",
)


def test_a_local_job_is_judged_only_on_the_host_that_runs_it(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("a UTS namespace needs root (CI runs as root)")
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    record = json.loads(mt("submit", GEMMA, "--wait", "--json").stdout)
    job = record["key"]
    try:
        # There its wrapper's pid means nothing: it says so, and decides nothing.
        elsewhere = json.loads(mt("status", "--json", prefix=_ON_OTHER_HOST).stdout)
        [row] = [r for r in elsewhere if r["key"] == job]
        assert row["state"] == "ready"
        assert row["scheduler"] == {"state": "unknown", "reason": f"runs on {os.uname()[1]}"}
        table = " ".join(mt("status", prefix=_ON_OTHER_HOST).stdout.split())  # cells may wrap
        assert "ready (unknown:" in table and f"runs on {os.uname()[1]})" in table
        refused = mt("cancel", job, prefix=_ON_OTHER_HOST, check=False)
        assert refused.returncode == 1
        assert f"runs on {os.uname()[1]}, not on this host" in refused.stderr
        assert "hint: cancel it there" in refused.stderr
        # Still ready, still served, where it runs.
        here = json.loads(mt("status", "--json").stdout)
        assert [(r["key"], r["state"]) for r in here] == [(job, "ready")]
        assert engine_processes(record["engine_pid"])
    finally:
        mt("cancel", job, check=False)
    assert engine_processes(record["engine_pid"]) == []


def _ours(home: Path) -> list[psutil.Process]:
    """Processes left from jobs of this MT_HOME (wrappers name their plan under it)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(home) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def test_submit_on_a_full_disk_is_an_error_and_starts_nothing(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    home = Path(os.environ["MT_HOME"])
    with tmpfs.mounted(home):
        for sub in ("registry", "jobs", "logs"):
            (home / sub).mkdir(mode=0o700)
        tmpfs.fill(home)
        done = mt("submit", GEMMA, check=False)
        assert done.returncode == 1
        assert "error: cannot write the job plan" in done.stderr
        assert "No space left on device" in done.stderr and "hint:" in done.stderr
        assert "Traceback" not in done.stderr
        assert list((home / "registry").iterdir()) == []
        assert list((home / "jobs").iterdir()) == []
        assert _ours(home) == []


def test_a_record_that_cannot_be_written_cancels_the_job_it_was_for(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    home = Path(os.environ["MT_HOME"])
    registry_dir = tmp_path / "full-registry"
    with tmpfs.mounted(registry_dir):
        tmpfs.fill(registry_dir)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / "site.yaml").write_text(f"registry_dir: {json.dumps(str(registry_dir))}\n")
        done = mt("submit", GEMMA, check=False)
        assert done.returncode == 1, done.stderr
        assert "No space left on device" in done.stderr
        assert "was cancelled, nothing is left running" in done.stderr
        assert "hint:" in done.stderr and "Traceback" not in done.stderr
        deadline = time.monotonic() + 30
        while _ours(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ours(home) == []
        assert [p.name for p in registry_dir.iterdir()] == ["filler"]
