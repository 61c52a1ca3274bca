"""A local job whose wrapper is killed while its engine loads, through the real `mt` CLI.

The engine is ``llama-server`` as the wrapper finds it on PATH: here a fake one
(tests/fake_engine.py behind a small ``llama-server`` script) that loads forever and never
listens, so the kill always lands while it loads. The wrapper is the real one, started by
the real local backend; `mt status` is the real CLI. Every process a test starts is
stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mtcli import mt

from hpc.liveness import alive
from hpc.registry import Record, Registry

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py").resolve()

pytestmark = pytest.mark.timeout(120)

_SHIM = """#!{python}
# llama-server as the job wrapper starts it, standing in for the real one: a fake engine
# in mode {mode} on the --host it is given: a Unix socket (the model and alias are ignored).
import os, sys
args = sys.argv[1:]
host = args[args.index("--host") + 1]
argv = [{python!r}, "-u", {engine!r}, "serve", "--host", host]
os.execv(argv[0], argv + ["--mode", {mode!r}])
"""


@pytest.fixture
def slow_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """models.yaml with model ``slow`` (llama.cpp, a fake llama-server first on PATH)."""
    gguf = tmp_path / "slow-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - name: slow\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        "    startup_timeout_s: 300\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    yield bin_dir
    registry = Registry(Path(os.environ["MT_HOME"]) / "registry")
    for record in registry.records():
        for pid in (record.pid, record.engine_pid):
            if pid is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()


def _engine(bin_dir: Path, mode: str) -> None:
    shim = bin_dir / "llama-server"
    shim.write_text(
        _SHIM.format(python=sys.executable, engine=str(FAKE_ENGINE), mode=mode), encoding="utf-8"
    )
    shim.chmod(0o755)


def _loading(key: str) -> Record:
    """The job's record once its engine runs (``starting``, with the engine's pid)."""
    registry = Registry(Path(os.environ["MT_HOME"]) / "registry")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        record = registry.read(key)
        if record is not None and record.state == "starting" and record.engine_pid:
            return record
        time.sleep(0.05)
    raise AssertionError(f"no starting record with an engine pid: {registry.read(key)!r}")


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def _status(key: str) -> dict[str, object]:
    [row] = [r for r in json.loads(mt("status", "--all", "--json").stdout) if r["key"] == key]
    return dict(row)


def _submit_and_kill_the_wrapper(bin_dir: Path, mode: str) -> Record:
    _engine(bin_dir, mode)
    key = json.loads(mt("submit", "slow", "--json").stdout)["key"]
    record = _loading(key)
    assert record.pid is not None and record.engine_pid is not None
    log = Path(os.environ["MT_HOME"]) / "logs" / f"{key}.log"
    deadline = time.monotonic() + 30
    while "loading weights 3/3" not in log.read_text(encoding="utf-8", errors="replace"):
        assert time.monotonic() < deadline, log.read_text(encoding="utf-8", errors="replace")
        time.sleep(0.05)
    assert alive(record.engine_pid)
    os.kill(record.pid, signal.SIGKILL)  # the OOM killer, or kill -9
    assert _gone_within(record.pid, 10)
    return record


def test_an_engine_dies_with_its_killed_wrapper_and_status_marks_the_job_failed(
    slow_model: Path,
) -> None:
    record = _submit_and_kill_the_wrapper(slow_model, "never")
    # The kernel tells the engine its parent died (PR_SET_PDEATHSIG): no one has to find it.
    assert _gone_within(record.engine_pid or 0, 5), "the engine outlived its wrapper"
    row = _status(record.key)
    assert row["state"] == "failed"
    assert f"wrapper died: pid {record.pid} on {os.uname()[1]}" in str(row["reason"])


def test_status_stops_an_engine_deaf_to_its_wrappers_death(slow_model: Path) -> None:
    record = _submit_and_kill_the_wrapper(slow_model, "stubborn")
    assert record.engine_pid is not None
    time.sleep(1)
    assert alive(record.engine_pid)  # it ignored the stop signal its wrapper's death sent it
    row = _status(record.key)  # on the host that ran it: it may judge, and it does
    assert row["state"] == "failed"
    assert f"its engine (pid {record.engine_pid}) was stopped" in str(row["reason"])
    assert row["engine_pid"] is None
    assert _gone_within(record.engine_pid, 5)


def test_status_cleans_old_tmp_files_and_dead_writers_locks(slow_model: Path) -> None:
    registry = Registry(Path(os.environ["MT_HOME"]) / "registry")
    registry.ensure()
    old_tmp = registry.path / ".local-x.json.4242.abcd1234.tmp"
    fresh_tmp = registry.path / ".local-y.json.4242.abcd1234.tmp"  # maybe a live writer's
    dead_lock = registry.path / "local-x.lock"
    for path in (old_tmp, fresh_tmp):
        path.write_text("{")
    ancient = time.time() - 3600
    os.utime(old_tmp, (ancient, ancient))
    dead_lock.write_text(json.dumps({"host": os.uname()[1], "pid": 2**22 + 1, "since": 0}))
    mt("status")
    assert sorted(p.name for p in registry.path.iterdir()) == [fresh_tmp.name]
