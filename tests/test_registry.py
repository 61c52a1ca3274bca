"""The registry: atomic records under concurrent processes, permissions, keys, lookups."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pydantic
import pytest

from hpc.errors import RegistryError
from hpc.permissions import InsecurePermissionsError
from hpc.registry import Record, Registry, new_api_key, record_key

WRITERS = 4
READERS = 2
ROUNDS = 300
SHARED = "shared"

_SPAWN = multiprocessing.get_context("spawn")


def _record(job_id: str, *, backend: str = "local", **fields: Any) -> Record:
    values: dict[str, Any] = {
        "backend": backend,
        "job_id": job_id,
        "nonce": "n0nce",
        "model": "Qwen3-Coder-30B-A3B",
        "engine": "vllm",
        "state": "ready",
        "api_key": new_api_key(),
    }
    return Record(**(values | fields))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tmp_files(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".tmp"))


# -- child processes (module level, so 'spawn' can import them) ---------------------------


def _writer(path: str, name: str, rounds: int) -> None:
    """Rewrite this writer's own record and the shared one, ``rounds`` times each."""
    registry = Registry(Path(path))
    # A tail of a few hundred lines makes each write big enough to be torn if it were not atomic.
    padding = [f"{name} log line {i:04d} " + "x" * 60 for i in range(300)]
    for i in range(rounds):
        registry.write(_record(name, generation=i, reason=name, log_tail=padding))
        registry.write(_record(SHARED, generation=i, reason=name, log_tail=padding))


def _reader(path: str, stop: Event, results: Any) -> None:
    """Read every record file continuously; report any read that was not a whole record."""
    registry = Registry(Path(path))
    reads, problems = 0, []
    while not stop.is_set():
        for entry in os.scandir(path):
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                raw = Path(entry.path).read_bytes()
            except FileNotFoundError:
                continue
            reads += 1
            try:
                json.loads(raw)
            except ValueError as exc:
                problems.append(f"{entry.name}: raw bytes are not JSON ({exc}): {raw[:80]!r}")
            if registry._load(Path(entry.path)) is None:
                problems.append(f"{entry.name}: Registry._load returned None for an existing file")
        records = registry.records()
        if len({r.key for r in records}) != len(records):
            problems.append(f"records() listed a record twice: {[r.key for r in records]}")
    results.put((reads, problems[:10]))


def _huge_writer(path: str, wrote_once: Event) -> None:
    """Write a multi-megabyte record over and over until killed."""
    registry = Registry(Path(path))
    tail = ["y" * 100] * 40_000
    i = 0
    while True:
        registry.write(_record("big", generation=i, log_tail=tail))
        wrote_once.set()
        i += 1


# -- tests ----------------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.mark.timeout(240)
def test_concurrent_writers_and_readers_never_see_a_partial_record(
    registry: Registry, children: list[Any]
) -> None:
    registry.ensure()
    stop = _SPAWN.Event()
    results = _SPAWN.Queue()
    readers = [
        _SPAWN.Process(target=_reader, args=(str(registry.path), stop, results))
        for _ in range(READERS)
    ]
    writers = [
        _SPAWN.Process(target=_writer, args=(str(registry.path), f"writer{n}", ROUNDS))
        for n in range(WRITERS)
    ]
    children += readers + writers
    for proc in readers + writers:
        proc.start()
    for proc in writers:
        proc.join(timeout=180)
        assert proc.exitcode == 0
    stop.set()
    outcomes = [results.get(timeout=60) for _ in readers]
    for proc in readers:
        proc.join(timeout=30)
        assert proc.exitcode == 0

    for reads, problems in outcomes:
        assert problems == []
        assert reads > 0  # the readers really raced the writers
    # Nothing lost: every writer's record holds its last round, and the shared record holds
    # the last round of whichever writer renamed last.
    records = {r.job_id: r for r in registry.records()}
    assert sorted(records) == sorted([SHARED] + [f"writer{n}" for n in range(WRITERS)])
    for n in range(WRITERS):
        assert records[f"writer{n}"].generation == ROUNDS - 1
    assert records[SHARED].generation == ROUNDS - 1
    assert records[SHARED].reason in {f"writer{n}" for n in range(WRITERS)}
    assert _tmp_files(registry.path) == []


@pytest.mark.timeout(120)
def test_a_writer_killed_mid_write_leaves_the_previous_record(
    registry: Registry, children: list[Any]
) -> None:
    registry.ensure()
    wrote_once = _SPAWN.Event()
    child = _SPAWN.Process(target=_huge_writer, args=(str(registry.path), wrote_once))
    children.append(child)
    child.start()
    assert wrote_once.wait(timeout=60)
    assert child.pid is not None
    # Freeze the writer and look: if a tmp file exists it is between open and rename, and
    # SIGKILL leaves it exactly there. Otherwise let it run a little and look again.
    for _ in range(2000):
        os.kill(child.pid, signal.SIGSTOP)
        if _tmp_files(registry.path):
            break
        os.kill(child.pid, signal.SIGCONT)
        time.sleep(0.005)
    else:
        pytest.fail("never caught the writer between open and rename")
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL

    leftovers = _tmp_files(registry.path)
    assert len(leftovers) == 1
    raw = (registry.path / "local-big.json").read_bytes()
    stored = json.loads(raw)  # the last complete write, whole
    assert len(stored["log_tail"]) == 40_000
    record = registry.read("local-big")
    assert record is not None
    assert record.generation == stored["generation"]
    assert [r.key for r in registry.records()] == ["local-big"]  # the tmp file is no record
    assert registry.find("big") == record

    # It was killed holding the record's lock: its pid is dead here, so the lock (and the
    # writer's own name for it) goes at once; the tmp file might be a live writer's.
    assert registry.clean_tmp(older_than_s=600) == 2
    assert _tmp_files(registry.path) == leftovers
    assert registry.clean_tmp(older_than_s=0) == 1
    assert _tmp_files(registry.path) == []
    assert os.listdir(registry.path) == ["local-big.json"]
    assert registry.read("local-big") == record


def test_leftover_tmp_files_are_not_records(registry: Registry) -> None:
    registry.write(_record("1"))
    (registry.path / ".local-2.999.abcd1234.tmp").write_text('{"backend": "local", "job_')
    (registry.path / "local-3.json.tmp").write_text("{}")
    assert [r.key for r in registry.records()] == ["local-1"]
    assert registry.find("2") is None
    assert registry.clean_tmp(older_than_s=0) == 2
    assert sorted(os.listdir(registry.path)) == ["local-1.json"]


def test_files_are_0600_and_the_directory_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        registry = Registry(tmp_path / "a" / "registry")
        record = _record("1")
        registry.write(record)
    finally:
        os.umask(old)
    assert _mode(registry.path) == 0o700
    assert _mode(registry.path / f"{record.key}.json") == 0o600


def test_a_world_readable_directory_and_record_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)  # noqa: S103 - the loose mode under test
    registry = Registry(path)
    with pytest.raises(InsecurePermissionsError, match=r"registry \(directory, mode 0755"):
        registry.ensure()
    assert _mode(path) == 0o755  # refused, not silently tightened: it may have been read
    os.chmod(path, 0o700)
    loose = path / "local-1.json"
    loose.write_text(_record("1").model_dump_json())
    os.chmod(loose, 0o644)
    with pytest.raises(InsecurePermissionsError, match=r"local-1.json \(file, mode 0644"):
        registry.records()
    with pytest.raises(InsecurePermissionsError) as refused:
        registry.read("local-1")
    assert refused.value.hint == f"chmod 600 {loose}"
    monkeypatch.setenv("MT_ALLOW_INSECURE_PERMISSIONS", "1")
    assert [r.job_id for r in registry.records()] == ["1"]
    registry.write(_record("1"))
    assert _mode(loose) == 0o600  # every write is 0600


def test_the_key_is_stored_but_never_in_public_output(registry: Registry) -> None:
    key = new_api_key()
    registry.write(_record("1", api_key=key))
    assert key.encode() in (registry.path / "local-1.json").read_bytes()  # the gateway needs it
    record = registry.read("local-1")
    assert record is not None
    assert record.api_key.get_secret_value() == key
    dumps = [
        json.dumps(record.public()),
        json.dumps([r.public() for r in registry.records()]),
        repr(record),
        str(record),
        json.dumps(record.model_dump(), default=str),
    ]
    for text in dumps:
        assert key not in text
    assert "api_key" not in record.public()


def test_find_by_key_and_by_bare_job_id(registry: Registry) -> None:
    registry.write(_record("1234", backend="slurm"))
    registry.write(_record("ab12cd34"))
    slurm = registry.find("slurm-1234")
    assert slurm is not None
    assert (slurm.backend, slurm.job_id) == ("slurm", "1234")
    assert registry.find("1234") == slurm
    by_id = registry.find("ab12cd34")
    assert by_id is not None
    assert by_id.key == "local-ab12cd34"
    assert registry.find("999") is None
    assert registry.find("../local-ab12cd34") is None


def test_hostile_job_ids_stay_inside_the_directory(registry: Registry) -> None:
    record = _record("../../etc/passwd; echo x\n")
    registry.write(record)
    assert record.key == record_key("local", "../../etc/passwd; echo x\n")
    assert "/" not in record.key
    assert "\n" not in record.key
    assert [p.parent for p in registry.path.iterdir()] == [registry.path]
    assert registry.find(record.job_id) == registry.read(record.key)


def test_update_refuses_an_older_generation(registry: Registry) -> None:
    registry.write(_record("1", backend="slurm", generation=2))
    with pytest.raises(RegistryError, match="generation 2, not 1") as caught:
        registry.update("slurm-1", expect_generation=1, state="gone")
    assert caught.value.hint is not None
    current = registry.read("slurm-1")
    assert current is not None
    assert current.state == "ready"

    updated = registry.update("slurm-1", expect_generation=2, state="draining")
    assert updated.state == "draining"
    assert registry.read("slurm-1") == updated


def test_update_validates_what_it_writes(registry: Registry) -> None:
    registry.write(_record("1"))
    with pytest.raises(pydantic.ValidationError):
        registry.update("local-1", state="exploded")
    current = registry.read("local-1")
    assert current is not None
    assert current.state == "ready"
    # A new key given as text is stored (and kept secret) like any other.
    registry.update("local-1", api_key="mtj-rotated")
    rotated = registry.read("local-1")
    assert rotated is not None
    assert rotated.api_key.get_secret_value() == "mtj-rotated"
    assert "mtj-rotated" not in json.dumps(rotated.public())
    with pytest.raises(RegistryError, match="no record local-2"):
        registry.update("local-2", state="gone")


def test_remove_and_a_missing_directory(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "not-yet")
    assert registry.records() == []
    assert registry.read("local-1") is None
    assert registry.clean_tmp(older_than_s=0) == 0
    registry.write(_record("1"))
    registry.remove("local-1")
    registry.remove("local-1")
    assert registry.records() == []


def test_an_unusable_directory_is_a_registry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    registry = Registry(blocker / "registry")
    with pytest.raises(RegistryError) as caught:
        registry.write(_record("1"))
    assert caught.value.hint is not None
    assert "registry_dir" in caught.value.hint


def test_create_never_overwrites_an_existing_record(tmp_path: Path) -> None:
    """A backend's late `pending` write must not clobber what the job wrapper already wrote."""
    registry = Registry(tmp_path / "reg")
    first = _record("77", state="starting")
    assert registry.create(first) is True
    late = _record("77", state="pending")
    assert registry.create(late) is False
    stored = registry.read(first.key)
    assert stored is not None and stored.state == "starting"
    assert [p.name for p in (tmp_path / "reg").iterdir()] == [f"{first.key}.json"]
