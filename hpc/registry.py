"""The registry: one JSON record per job in a directory on the shared filesystem.

Writes are tmp file + fsync + rename in the same directory, so a reader sees either the old
record or the new one, never a part (rename is atomic on POSIX filesystems, NFS included).
No lock and no database: each job's record has one writer at a time (the backend before the
job runs, the job wrapper while it runs), and a record whose job is gone is checked against
the scheduler rather than trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer

from hpc.errors import RegistryError
from hpc.privatefile import TMP_SUFFIX, write_private

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
    pid: int | None = Field(default=None, description="local backend: the job wrapper's pid")
    engine_pid: int | None = None
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
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

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
    )


def record_key(backend: str, job_id: str) -> str:
    """``slurm`` + ``1234`` → ``slurm-1234`` (safe as a file name)."""
    return _SAFE.sub("_", f"{backend}-{job_id}")


class Registry:
    """A directory of records; created 0700, every file 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the directory (0700) if needed; refuse one other users can read."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = self.path.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(self.path, 0o700)
        except OSError as exc:
            raise RegistryError(
                f"cannot use registry directory {self.path}: {exc.strerror}",
                path=self.path,
                hint="set registry_dir in site.yaml to a directory you own",
            ) from exc

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.json"

    def write(self, record: Record) -> None:
        """Replace the record atomically: tmp + fsync + rename + fsync of the directory."""
        self._publish(record, replace=True)

    def create(self, record: Record) -> bool:
        """Write the record only if none exists under its key; False if one already did.

        ``link`` fails on an existing name atomically (NFS included), so a backend's
        ``pending`` record never overwrites what a job that started early has written.
        """
        return self._publish(record, replace=False)

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
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryError(f"cannot read {path}: {exc.strerror}", path=path) from exc
        try:
            return Record.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            # Never partial (rename is atomic), so this is a foreign or older-format file.
            return None

    def records(self) -> list[Record]:
        """Every readable record, oldest first. Leftover tmp files are not records."""
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

    def update(self, key: str, *, expect_generation: int | None = None, **fields: object) -> Record:
        """Read, change some fields, write back. Refuses to overwrite a newer generation."""
        current = self.read(key)
        if current is None:
            raise RegistryError(f"no record {key}", path=self._file(key))
        if expect_generation is not None and current.generation != expect_generation:
            raise RegistryError(
                f"record {key} is generation {current.generation}, not {expect_generation}",
                path=self._file(key),
                hint="the job was requeued; the old run must not change the new one's record",
            )
        # Validated, so a bad state name fails here (not on read) and a str key becomes secret.
        changed = Record.model_validate({**current.model_dump(), **fields})
        self.write(changed)
        return changed

    def remove(self, key: str) -> None:
        """Delete a record (a submit that failed after writing it)."""
        with contextlib.suppress(FileNotFoundError):
            self._file(key).unlink()

    def clean_tmp(self, older_than_s: float = 600) -> int:
        """Remove tmp files a killed writer left behind; returns how many it removed."""
        removed = 0
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
