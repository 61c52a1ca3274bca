"""Helpers for tests that drive the real `mt` CLI and gateway as subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

GEMMA = "gemma-3-270m"


def owner_key() -> str:
    """This test's gateway key: the owner key `mt gateway` made in the test's MT_HOME."""
    from hpc.ownerkey import owner_key_path, read_owner_key
    from hpc.site import mt_home

    return read_owner_key(owner_key_path(mt_home()))


def owner_headers() -> dict[str, str]:
    """``Authorization: Bearer <owner key>``, for urllib requests to a `mt gateway`."""
    return {"Authorization": f"Bearer {owner_key()}"}


def mt(
    *args: str, check: bool = True, timeout_s: float = 240, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI with the test's environment (MT_HOME, MT_MODELS, SLURM_CONF).

    ``prefix`` runs it through another command (``ip netns exec NS``: on another "node").
    """
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "hpc.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"mt {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


# The flags users write for llama-server, what `engine: llamacpp` runs; and the same setting
# for llama-cpp-python's server, the fallback (tests/pythonserver.py forces it).
LLAMA_SERVER_ARGS = ("--ctx-size", "1024")
PYTHON_SERVER_ARGS = ("--n_ctx", "1024", "--chat_format", "alpaca")


def gemma_models_yaml(
    path: Path, gguf: Path, extra: str = "", engine_args: Sequence[str] = LLAMA_SERVER_ARGS
) -> Path:
    """A models.yaml serving the real Gemma GGUF (by default with llama-server's flags)."""
    path.write_text(
        "models:\n"
        f"  - name: {GEMMA}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        f"    engine_args: {json.dumps(list(engine_args))}\n"
        "    startup_timeout_s: 120\n"
        "    resources: {cpus: 1, mem_gb: 1, time_limit_min: 30}\n" + extra,
        encoding="utf-8",
    )
    return path


# What a client test clears from its environment: this machine's own settings for mt, Slurm
# and the clients under test.
CLIENT_ENV_CLEARED = ("MT_", "SLURM_", "OPENAI_", "ANTHROPIC_")


def llama_server_binary(value: str) -> Path:
    """The llama-server MT_LLAMA_SERVER named (``value``, read at the test module's import,
    before tests/conftest.py clears MT_*), or the missing part ``llamaserver``."""
    from realparts import missing_part

    binary = Path(value) if value else None
    if binary is None or not os.access(binary, os.X_OK):
        missing_part("llamaserver", f"MT_LLAMA_SERVER={value!r} (make test builds it)")
        raise AssertionError("unreachable")
    return binary


@contextmanager
def llama_server_home(
    root: Path,
    llama_server: Path,
    models_yaml: str,
    cleared: tuple[str, ...] = CLIENT_ENV_CLEARED,
) -> Iterator[None]:
    """A fresh `mt` home under ``root`` whose jobs run ``llama_server``: the ``cleared``
    prefixes (MT_*, SLURM_*, OPENAI_*, ANTHROPIC_*) and KUBECONFIG cleared, ``models_yaml`` as
    MT_MODELS, llama-server first on the PATH; all restored at the end (module fixtures cannot
    use ``monkeypatch``)."""
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith(cleared) or name == "KUBECONFIG":
                env.delenv(name)
        env.setenv("MT_HOME", str(root / "mt-home"))
        env.setenv("PATH", f"{llama_server.parent}:{os.environ['PATH']}")
        models = root / "models.yaml"
        models.write_text(models_yaml, encoding="utf-8")
        env.setenv("MT_MODELS", str(models))
        yield


@contextmanager
def ready_job(model: str, *args: str) -> Iterator[dict[str, object]]:
    """`mt submit MODEL --wait --json ARGS`: the job's JSON (asserted ``ready``); cancelled
    at the end whatever happened."""
    submitted = json.loads(mt("submit", model, "--wait", "--json", *args).stdout)
    try:
        assert submitted["state"] == "ready", submitted
        yield submitted
    finally:
        mt("cancel", str(submitted["key"]), check=False)


@contextmanager
def running_gateway(
    *args: str, prefix: Sequence[str] = (), stderr_path: Path | None = None
) -> Iterator[str]:
    """`mt gateway --port 0` in the background; yields its URL; stops it (whole group).

    It requires a key: :func:`owner_key` (created in the test's MT_HOME as it starts).

    ``prefix`` must exec the gateway (as ``ip netns exec`` does): the group is its own.
    ``stderr_path`` keeps its log in a file (the test reads it while it runs).
    """
    err = stderr_path.open("w", encoding="utf-8") if stderr_path is not None else None
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "hpc.cli", "gateway", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=err if err is not None else subprocess.PIPE,
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
        if err is not None:
            err.close()


def engine_processes(engine_pid: int | None) -> list[psutil.Process]:
    """The llama.cpp server a job's record names (its ``engine_pid``), if it still runs."""
    try:
        proc = psutil.Process(engine_pid or 0)
        cmdline = proc.cmdline()
        running = proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return []
    return [proc] if is_llamacpp_engine(cmdline) and running else []


def is_llamacpp_engine(cmdline: Sequence[str]) -> bool:
    """Whether ``cmdline`` is a llama.cpp server a job started: llama-server (exec'd by
    hpc.job.keypipe), or llama-cpp-python's server (the fallback)."""
    if cmdline and Path(cmdline[0]).name == "llama-server":
        return True
    return "hpc.job.llamacpp_python" in cmdline or "llama_cpp.server" in cmdline
