"""The registry: one JSON record per job in a directory on the shared filesystem.

Writes are tmp file + fsync + rename in the same directory, so a reader sees either the old
record or the new one, never a part (rename is atomic on POSIX filesystems, NFS included).
Every write of an existing record runs under that record's lock (``hpc.recordlock``: the
link-count method, safe on NFS) and bumps its ``version``, so the job wrapper, ``mt status``,
``mt cancel`` and the gateway never lose each other's updates. What may replace what is
decided in one place, :func:`replaces`: an older run never writes over a newer one, and a
final state is never followed by a non-final one of the same run. No database: a record
whose job is gone is checked against the scheduler rather than trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from hpc.errors import RegistryError
from hpc.permissions import check_open, enforce
from hpc.phases import Phases
from hpc.privatefile import TMP_SUFFIX, make_private_dir, write_private
from hpc.recordlock import STALE_S as LOCK_STALE_S
from hpc.recordlock import WAIT_S as LOCK_WAIT_S
from hpc.recordlock import RecordLock, clean_locks

State = Literal["pending", "starting", "ready", "draining", "gone", "failed"]
STATES: tuple[State, ...] = ("pending", "starting", "ready", "draining", "gone", "failed")
FINAL_STATES: frozenset[State] = frozenset({"gone", "failed"})

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def new_nonce() -> str:
    """A short random id that names one submission (job names, lookups after a timeout)."""
    return secrets.token_hex(4)


def new_api_key() -> str:
    """A per-job key the engine requires and only the gateway (and the job) knows."""
    return "mtj-" + secrets.token_urlsafe(32)


class Record(BaseModel):
    """What the registry knows of one job: who runs it, where it listens, how it is."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    job_id: str
    generation: int = Field(default=0, ge=0, description="restart count: a requeue bumps it")
    nonce: str
    model: str
    engine: str
    state: State
    node: str | None = None
    port: int | None = None
    base_url: str | None = Field(default=None, description="the engine's OpenAI root, …/v1")
    api_key: SecretStr
    tls_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the job front's TLS certificate: clients pin it (hpc.tlspin)",
    )
    pid: int | None = Field(default=None, description="the job wrapper's pid (on ``host``)")
    pid_started_at: float | None = Field(default=None, description="the wrapper's start time")
    host: str | None = Field(
        default=None,
        description="the host the job wrapper runs on: the only one that can judge its pids",
    )
    boot_id: str | None = Field(default=None, description="that host's boot when it started")
    engine_pid: int | None = None
    engine_started_at: float | None = Field(default=None, description="the engine's start time")
    health_path: str | None = Field(
        default=None,
        description="the engine's health URL path (``/health``, ``/v1/models``) the job wrapper "
        "waited on; the gateway keeps probing it",
    )
    log_path: str | None = None
    reason: str | None = None
    log_tail: list[str] = Field(default_factory=list)
    started_by: str | None = Field(
        default=None,
        description="who started the job and why (e.g. the gateway, on demand, for a request)",
    )
    serves: tuple[str, ...] = Field(
        default=(),
        description="a swap pool's catalogue: the model names its endpoint answers for",
    )
    phases: Phases | None = Field(
        default=None, description="start-up phases and their durations (the job wrapper's)"
    )
    # continuity: handover (hpc.job.handover): the chain of jobs that serve one model in turn.
    predecessor: str | None = Field(
        default=None, description="the job id this job took over from (continuity: handover)"
    )
    successor: str | None = Field(default=None, description="the job that takes over from it")
    successor_nonce: str | None = Field(
        default=None,
        description="the successor's nonce, reserved under the record's lock before sbatch: "
        "a wrapper signalled twice or restarted finds that job instead of submitting another",
    )
    handover_at: float | None = Field(
        default=None, description="when this job submits its successor (epoch seconds)"
    )
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    version: int = Field(default=0, ge=0, description="bumped by every write (check-and-set)")

    @field_serializer("api_key", when_used="json")
    def _reveal(self, key: SecretStr) -> str:
        return key.get_secret_value()

    @property
    def key(self) -> str:
        """The file name this record lives under."""
        return record_key(self.backend, self.job_id)

    def public(self) -> dict[str, object]:
        """The record as JSON-ready data without the per-job key (for `--json` output)."""
        data = self.model_dump(mode="json")
        data.pop("api_key", None)
        data["key"] = self.key
        return data


def pending_record(
    backend: str,
    job_id: str,
    nonce: str,
    *,
    model: str,
    engine: str,
    log_path: str | None,
    started_by: str | None = None,
    predecessor: str | None = None,
) -> Record:
    """A new job's first record: ``pending``, with a fresh per-job key."""
    return Record(
        backend=backend,
        job_id=job_id,
        nonce=nonce,
        model=model,
        engine=engine,
        state="pending",
        api_key=SecretStr(new_api_key()),
        log_path=log_path,
        started_by=started_by,
        predecessor=predecessor,
    )


def replaces(current: Record, new: Record) -> bool:
    """The one rule for what may be written over a stored record (``current``).

    A newer generation (a requeued job's next run) always may, an older one never: the old
    run must not change the new one's record. Within a generation a final state (``gone``,
    ``failed``) is never followed by a non-final one: once ``mt cancel`` or ``mt status``
    has ended a record, the wrapper's late ``draining`` or ``ready`` does not revive it (a
    final state may still be replaced by another, more precise one).
    """
    if new.generation != current.generation:
        return new.generation > current.generation
    return current.state not in FINAL_STATES or new.state in FINAL_STATES


def record_key(backend: str, job_id: str) -> str:
    """``slurm`` + ``1234`` → ``slurm-1234`` (safe as a file name)."""
    return _SAFE.sub("_", f"{backend}-{job_id}")


class Registry:
    """A directory of records; created 0700, every file 0600."""

    def __init__(
        self, path: Path, *, lock_wait_s: float = LOCK_WAIT_S, lock_stale_s: float = LOCK_STALE_S
    ) -> None:
        self.path = path
        self.lock_wait_s = lock_wait_s  # how long a write waits for a record's lock
        self.lock_stale_s = lock_stale_s  # a lock older than this is broken

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        """Hold record ``key``'s lock (``hpc.recordlock``) for the block."""
        lock = RecordLock(self.path, key, stale_s=self.lock_stale_s)
        try:
            lock.acquire(self.lock_wait_s)
        except OSError as exc:  # the lock file itself: a read-only or full filesystem
            raise RegistryError(
                f"cannot write record {key}: {exc.strerror}", path=self.path
            ) from exc
        try:
            yield
        finally:
            lock.release()

    def ensure(self) -> None:
        """Create the directory (0700, parents too) if needed; refuse one other users can
        reach (hpc.permissions: InsecurePermissionsError, unless the bypass is set)."""
        try:
            make_private_dir(self.path)
        except OSError as exc:
            raise RegistryError(
                f"cannot use registry directory {self.path}: {exc.strerror}",
                path=self.path,
                hint="set registry_dir in site.yaml to a directory you own",
            ) from exc
        enforce([self.path])

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.json"

    def write(self, record: Record) -> None:
        """Replace the record as a whole (under its lock; its version follows the stored one).

        Atomic: tmp + fsync + rename + fsync of the directory. No rule is applied: code
        that changes a record it did not just create uses :meth:`modify` or :meth:`update`.
        """
        self.modify(record.key, lambda _current: record, rule=False)

    def create(self, record: Record) -> bool:
        """Write the record only if none exists under its key; False if one already did.

        ``link`` fails on an existing name atomically (NFS included), so a backend's
        ``pending`` record never overwrites what a job that started early has written.
        """
        return self._publish(record, replace=False)

    def modify(
        self,
        key: str,
        change: Callable[[Record | None], Record | None],
        *,
        rule: bool = True,
    ) -> Record | None:
        """The one read-modify-write: under the record's lock, read it, ``change`` it, write.

        ``change`` gets the stored record (None if there is none) and returns the record to
        store, or None (or the record it got) to leave it as it is. A change that
        :func:`replaces` forbids is not written. Returns the record as stored afterwards.
        """
        self.ensure()
        with self._locked(key):
            current = self.read(key)
            wanted = change(current)
            if wanted is None or wanted is current:
                return current
            return self._store(current, wanted, rule=rule)

    def _store(self, current: Record | None, wanted: Record, *, rule: bool = True) -> Record:
        """Write ``wanted`` over ``current`` (lock held) unless the rule forbids it."""
        if rule and current is not None and not replaces(current, wanted):
            return current
        version = current.version + 1 if current is not None else 0
        wanted = wanted.model_copy(update={"version": version})
        self._publish(wanted, replace=True)
        return wanted

    def _publish(self, record: Record, *, replace: bool) -> bool:
        self.ensure()
        record.updated_at = time.time()
        data = record.model_dump_json(indent=2).encode()
        try:
            return write_private(self._file(record.key), data, replace=replace)
        except OSError as exc:
            raise RegistryError(
                f"cannot write record {record.key}: {exc.strerror}", path=self.path
            ) from exc

    def read(self, key: str) -> Record | None:
        """The record stored under ``key``, or None if there is none (or it is unreadable)."""
        return self._load(self._file(key))

    def _load(self, path: Path) -> Record | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}", path=path) from exc
        try:
            # A record holds its job's key: one others can read (or did not write) is
            # refused, checked on the file actually opened (hpc.permissions).
            check_open(path, os.fstat(fd))
            with os.fdopen(fd, "rb", closefd=False) as stream:
                raw = stream.read()
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}", path=path) from exc
        finally:
            os.close(fd)
        try:
            return Record.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            # Never partial (rename is atomic), so this is a foreign or older-format file.
            return None

    def records(self) -> list[Record]:
        """Every readable record, oldest first. Tmp and lock files are not records."""
        out = [rec for path in self._json_files() if (rec := self._load(path)) is not None]
        return sorted(out, key=lambda r: r.created_at)

    def _json_files(self) -> Iterator[Path]:
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith("."):
                yield Path(entry.path)

    def find(self, job: str) -> Record | None:
        """A record by its key (``local-ab12cd34``) or its bare job id (``1234``)."""
        direct = self.read(_SAFE.sub("_", job))
        if direct is not None:
            return direct
        matches = [r for r in self.records() if r.job_id == job]
        return matches[-1] if matches else None

    def update(
        self,
        key: str,
        *,
        expect_generation: int | None = None,
        expect_version: int | None = None,
        **fields: object,
    ) -> Record:
        """Change some fields of a record (under its lock, by :func:`replaces`' rule).

        Refuses to change another generation than ``expect_generation`` (a requeue) or
        another version than ``expect_version`` (check-and-set: someone wrote since it was
        read). Returns the record as stored: unchanged if the rule refused the change.
        """

        self.ensure()
        with self._locked(key):
            current = self.read(key)
            if current is None:
                raise RegistryError(f"no record {key}", path=self._file(key))
            if expect_generation is not None and current.generation != expect_generation:
                raise RegistryError(
                    f"record {key} is generation {current.generation}, not {expect_generation}",
                    path=self._file(key),
                    hint="the job was requeued; the old run must not change the new one's record",
                )
            if expect_version is not None and current.version != expect_version:
                raise RegistryError(
                    f"record {key} is version {current.version}, not {expect_version}",
                    path=self._file(key),
                    hint="it was written since it was read: read it again and retry",
                )
            # Validated: a bad state name fails here (not on read), a str key becomes secret.
            return self._store(current, Record.model_validate({**current.model_dump(), **fields}))

    def remove(self, key: str, *, states: Collection[State] | None = None) -> bool:
        """Delete a record (a submit that failed after writing it); True if it was removed.

        With ``states``, only a record in one of them (checked under its lock): a pending
        record being withdrawn is not removed once its job's wrapper has claimed it.
        """
        if states is not None:
            self.ensure()
            with self._locked(key):
                current = self.read(key)
                if current is None or current.state not in states:
                    return False
                return self._unlink(key)
        return self._unlink(key)

    def _unlink(self, key: str) -> bool:
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def clean_tmp(self, older_than_s: float = 600) -> int:
        """Remove tmp files and lock files killed writers left behind (stale locks broken);
        returns how many it removed. Cheap: one directory listing."""
        removed = clean_locks(self.path, older_than_s, stale_s=self.lock_stale_s)
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name.endswith(TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed
