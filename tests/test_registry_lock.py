"""The registry's record lock and its one rule, with real processes and real files.

Many processes update one record at once and none of their updates is lost; a lock whose
holder was killed is broken, a live one makes a writer wait and then fail saying why; a
final state is never followed by a non-final one of the same run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from hpc.backends import JobStatus
from hpc.errors import RegistryError
from hpc.job.record import JobRecord, RecordEnded
from hpc.reconcile import settle
from hpc.recordlock import lock_path, record_lock
from hpc.registry import Record, Registry, new_api_key, replaces

PROCS = 8
UPDATES = 50
KEY = "local-counter"

_SPAWN = multiprocessing.get_context("spawn")


def _record(job_id: str = "counter", **fields: Any) -> Record:
    values: dict[str, Any] = {
        "backend": "local",
        "job_id": job_id,
        "nonce": "n0nce",
        "model": "m",
        "engine": "vllm",
        "state": "ready",
        "api_key": new_api_key(),
        "port": 0,
    }
    return Record(**(values | fields))


# -- child processes (module level, so 'spawn' can import them) ---------------------------


def _increment(path: str, go: Event) -> None:
    """Add one to the record's counter (its port), UPDATES times, each a read-modify-write."""
    registry = Registry(Path(path), lock_wait_s=60)
    go.wait()
    for _ in range(UPDATES):
        registry.modify(
            KEY, lambda r: r.model_copy(update={"port": (r.port or 0) + 1}) if r else None
        )


def _increment_by_check_and_set(path: str, go: Event) -> None:
    """The same through ``update(expect_version=…)``: read, then write only if unchanged."""
    registry = Registry(Path(path), lock_wait_s=60)
    go.wait()
    done = 0
    while done < UPDATES:
        current = registry.read(KEY)
        assert current is not None
        try:
            registry.update(KEY, expect_version=current.version, port=(current.port or 0) + 1)
        except RegistryError:
            continue  # someone wrote since we read: read again
        done += 1


def _hold(path: str, held: Event, hold_s: float, die: bool) -> None:
    """Take the record's lock, say so, then hold it for ``hold_s`` (or die holding it)."""
    with record_lock(Path(path), KEY):
        held.set()
        if die:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold_s)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.write(_record())
    return registry


def _run_all(target: Any, registry: Registry, children: list[Any]) -> None:
    go = _SPAWN.Event()
    procs = [_SPAWN.Process(target=target, args=(str(registry.path), go)) for _ in range(PROCS)]
    children.extend(procs)
    for proc in procs:
        proc.start()
    go.set()  # all at once, after the slow spawn start-up
    for proc in procs:
        proc.join(timeout=180)
        assert proc.exitcode == 0


# -- no lost update -------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize("target", [_increment, _increment_by_check_and_set])
def test_many_processes_updating_one_record_lose_no_update(
    registry: Registry, children: list[Any], target: Any
) -> None:
    _run_all(target, registry, children)
    record = registry.read(KEY)
    assert record is not None
    assert record.port == PROCS * UPDATES
    assert record.version == PROCS * UPDATES  # every write bumped it, once
    assert sorted(os.listdir(registry.path)) == [f"{KEY}.json"]  # no lock or tmp file left


# -- stale and live locks -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_lock_whose_holder_was_killed_is_broken_at_once(
    registry: Registry, children: list[Any]
) -> None:
    held = _SPAWN.Event()
    child = _SPAWN.Process(target=_hold, args=(str(registry.path), held, 0, True))
    children.append(child)
    child.start()
    assert held.wait(timeout=60)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert lock_path(registry.path, KEY).exists()  # left behind by the killed holder

    quick = Registry(registry.path, lock_wait_s=2)  # far less than the 30 s age bound
    assert quick.update(KEY, state="draining").state == "draining"
    assert sorted(os.listdir(registry.path)) == [f"{KEY}.json"]


@pytest.mark.timeout(60)
def test_a_live_lock_makes_a_writer_wait_then_fail_saying_why(
    registry: Registry, children: list[Any]
) -> None:
    held = _SPAWN.Event()
    child = _SPAWN.Process(target=_hold, args=(str(registry.path), held, 30, False))
    children.append(child)
    child.start()
    assert held.wait(timeout=60)

    impatient = Registry(registry.path, lock_wait_s=1)
    started = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        impatient.update(KEY, state="gone")
    assert time.monotonic() - started >= 1  # it waited
    lock = lock_path(registry.path, KEY)
    assert str(lock) in caught.value.message
    assert f"held by pid {child.pid} on {os.uname()[1]}" in caught.value.message
    assert caught.value.path == lock
    assert caught.value.hint is not None and "try again" in caught.value.hint
    stored = registry.read(KEY)
    assert stored is not None and stored.state == "ready"  # nothing was written

    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)  # the holder dies: the next writer breaks its lock
    child.join(timeout=30)
    assert impatient.update(KEY, state="gone").state == "gone"


def test_another_hosts_lock_is_waited_for_then_broken_by_age(registry: Registry) -> None:
    """Another login node's pid cannot be judged here: only the age bound breaks its lock."""
    lock = lock_path(registry.path, KEY)
    holder = {"host": "other-login-node", "boot_id": None, "pid": 1, "since": time.time()}
    lock.write_text(json.dumps(holder))
    with pytest.raises(RegistryError, match="held by pid 1 on other-login-node"):
        Registry(registry.path, lock_wait_s=0.3).update(KEY, state="gone")
    time.sleep(1.2)
    aged = Registry(registry.path, lock_wait_s=5, lock_stale_s=1)
    assert aged.update(KEY, state="gone").state == "gone"
    assert not lock.exists()


def test_lock_files_are_never_records_and_clean_tmp_removes_leftovers(
    registry: Registry,
) -> None:
    lock = lock_path(registry.path, KEY)
    lock.write_text(json.dumps({"host": os.uname()[1], "pid": 2**22 + 1, "since": 0}))
    unique = registry.path / f".{KEY}.lock.{os.uname()[1]}.999999.abcd1234"
    unique.write_text("{}")
    (registry.path / "local-2.json.lock").write_text("{}")
    assert [r.key for r in registry.records()] == [KEY]
    old = time.time() - 3600
    os.utime(unique, (old, old))
    # The dead holder's lock, its own name for it (old), and a contentless lock file whose
    # age only the filesystem knows (not yet stale): two of them.
    assert registry.clean_tmp() == 2
    assert sorted(os.listdir(registry.path)) == ["local-2.json.lock", f"{KEY}.json"]


# -- the one rule -------------------------------------------------------------------------


def test_the_rule_a_final_state_stays_final_within_a_run() -> None:
    for final in ("gone", "failed"):
        ended = _record(state=final, generation=1)
        for later in ("pending", "starting", "ready", "draining"):
            assert not replaces(ended, _record(state=later, generation=1))
            assert replaces(ended, _record(state=later, generation=2))  # a requeue's next run
        assert replaces(ended, _record(state="failed", generation=1))  # final by final
    running = _record(state="ready", generation=2)
    assert replaces(running, _record(state="draining", generation=2))
    assert not replaces(running, _record(state="gone", generation=1))  # an older run


def test_the_wrapper_never_revives_a_record_ended_from_outside(registry: Registry) -> None:
    said: list[str] = []
    job = JobRecord(registry.path, backend="local", job_id="counter", environ={}, say=said.append)
    mine = registry.read(KEY)
    assert mine is not None
    registry.update(KEY, state="gone", reason="cancelled")  # mt cancel, from outside
    with pytest.raises(RecordEnded, match="is gone: cancelled"):
        job.set(mine, "draining", reason="received SIGTERM")
    stored = registry.read(KEY)
    assert stored is not None and (stored.state, stored.reason) == ("gone", "cancelled")
    assert any("not moved to draining" in line for line in said)
    # Its own final word is still written (more precise than the outside one).
    assert job.set(mine, "gone", reason="stopped by SIGTERM").reason == "stopped by SIGTERM"


def test_settle_decides_on_the_stored_record_not_a_stale_copy(registry: Registry) -> None:
    stale_copy = registry.read(KEY)
    assert stale_copy is not None
    registry.update(KEY, state="gone", reason="stopped by SIGTERM")  # the wrapper, meanwhile
    after = settle(registry, stale_copy, JobStatus("running", serving="starting"))
    assert (after.state, after.reason) == ("gone", "stopped by SIGTERM")
    stored = registry.read(KEY)
    assert stored == after
