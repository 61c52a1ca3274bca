"""Node-local weight staging: the weights copied once into a cache on the node, kept across jobs.

Weights read from a parallel filesystem (Lustre, GPFS, NFS) dominate an engine's start-up,
at every launch. With ``weights.stage: node-local`` the job wrapper copies them (a file or a
folder) into a cache on the node before the engine starts, and hands the engine the copy.

Layout, in the site's ``staging.dir`` (``$TMPDIR``, ``/dev/shm`` or a node-local disk)::

    mt-staging-<uid>/            0700, this user's only: no other user reads or plants weights
      entries/<key>/<name>       one entry per source: the file or folder, under its own name
      entries/<key>.json         what it holds (source, bytes), written before the rename
      locks/<key>.lock           flock: held exclusive while the entry is checked or copied
      locks/<key>.use            flock: held shared by every job using the entry
      tmp/<key>.<random>/        a copy in progress, renamed into entries/ when complete

The key is a SHA-256 of the source's resolved path and, for every file under it, its relative
path, size and mtime: a source changed in place (a new size or mtime) gets a new entry. The
copy goes into ``tmp/`` and is renamed into ``entries/`` only when complete, so a job killed
mid-copy leaves no entry (its leftover is removed by the next job that takes that key's
lock). Two jobs on one node staging the same weights take the same lock: one copies, the
other waits and reuses. A job holds its entry's ``use`` lock (shared) until it exits; the
kernel drops it when the process dies, so no stale mark can pin an entry.

Eviction keeps the cache within ``staging.max_bytes`` and the disk's free space: least
recently used entries go first (an entry's mtime is touched at every use), and only entries
whose ``use`` lock can be taken exclusively (no running job uses them) are removed. Weights
that cannot be staged (no room even so, a full or read-only disk, a cache folder that is not
this user's) are served from their source, and the job says why: staging never stops a job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hpc.errors import MTError
from hpc.job.plan import JobPlan
from hpc.phases import Phases
from hpc.spec import ModelSpec

CHUNK_BYTES = 8 * 1024 * 1024
DIR_PREFIX = "mt-staging-"

# Called with the bytes copied so far, after every chunk (progress lines; tests pause here).
Progress = Callable[[int], None]


class StagingError(MTError):
    """The node-local cache cannot be used safely (another user's folder, loose permissions)."""


@dataclass(frozen=True)
class Staged:
    """The outcome of staging one source: what the engine reads, and what it cost."""

    path: Path  # the staged copy (or the source itself, when staging was skipped: see note)
    bytes_copied: int
    seconds: float
    key: str | None = None
    note: str | None = None  # why the source is used as it is, if it is

    @property
    def mb_s(self) -> float | None:
        """The copy rate in MB/s, if anything was copied."""
        if self.bytes_copied == 0 or self.seconds <= 0:
            return None
        return self.bytes_copied / 1e6 / self.seconds


def cache_root(setting: str, environ: Mapping[str, str]) -> Path:
    """This user's cache folder under the site's ``staging.dir`` (``$TMPDIR``: the job's
    temporary directory, else the system's)."""
    base = setting
    if setting == "$TMPDIR":
        base = environ.get("TMPDIR") or tempfile.gettempdir()
    return Path(base) / f"{DIR_PREFIX}{os.getuid()}"


def _private_dir(path: Path) -> None:
    """``path`` as a 0700 directory of this user; StagingError if it is anyone else's."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=False)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise StagingError(
            f"the staging folder {path} is not a directory of this user",
            hint="another user (or a link) holds this name on the node; set staging.dir in "
            "site.yaml to a folder of your own",
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)  # ours: tighten it rather than refuse


def fingerprint(source: Path) -> tuple[str, int]:
    """The cache key of ``source`` (path, and every file's relative path, size and mtime)
    and its size in bytes."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    total = 0
    for rel, info in _files(source):
        total += info.st_size
        digest.update(f"\0{rel}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()[:32], total


def _files(source: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every regular file under ``source`` (or ``source`` itself), sorted, with its stat."""
    if source.is_file():
        yield source.name, source.stat()
        return
    for root, dirs, names in os.walk(source):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file():
                yield str(path.relative_to(source)), path.stat()


def _lock(path: Path, mode: int) -> IO[bytes]:
    """``path`` opened and flock'ed (``LOCK_SH`` or ``LOCK_EX``), waiting while it is busy."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, mode)
    except BaseException:
        handle.close()
        raise
    return handle


def _try_lock(path: Path, mode: int) -> IO[bytes] | None:
    """``path`` opened and flock'ed (``LOCK_SH`` or ``LOCK_EX``); None if it is busy."""
    handle = path.open("ab")
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except BaseException:
        handle.close()
        raise
    return handle


class NodeCache:
    """This user's staging cache on this node (see the module doc)."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.entries = root / "entries"
        self.locks = root / "locks"
        self.tmp = root / "tmp"

    def open(self) -> None:
        """Create the folders (0700, checked: see :func:`_private_dir`)."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.root, self.entries, self.locks, self.tmp):
            _private_dir(path)

    def stage(
        self,
        source: Path,
        *,
        say: Callable[[str], None],
        progress: Progress | None = None,
    ) -> tuple[Staged, IO[bytes] | None]:
        """``source`` in the cache, copied if it is not there yet; and the ``use`` lock the
        caller holds while it uses the entry (close it, or exit, to release it).

        Weights that cannot be staged (no room even after eviction, a copy that fails) are
        served from ``source``: the result's ``note`` says why and no lock is returned.
        """
        started = time.monotonic()
        self.open()
        key, size = fingerprint(source)
        lock = _try_lock(self.locks / f"{key}.lock", fcntl.LOCK_EX)
        if lock is None:
            say(f"staging: {source} is being staged by another job on this node; waiting")
            lock = _lock(self.locks / f"{key}.lock", fcntl.LOCK_EX)
        with lock:
            # Taken under the key's lock, which an evictor needs too: the entry cannot go
            # between the check below and this job's use of it.
            use = _lock(self.locks / f"{key}.use", fcntl.LOCK_SH)
            try:
                staged, note = self._ensure(source, key, size, started, say, progress)
            except BaseException:
                use.close()
                raise
            if staged is not None:
                return staged, use
            use.close()
        say(f"staging: serving the weights from {source}: {note}")
        return Staged(source, 0, time.monotonic() - started, None, note), None

    def _ensure(
        self,
        source: Path,
        key: str,
        size: int,
        started: float,
        say: Callable[[str], None],
        progress: Progress | None,
    ) -> tuple[Staged | None, str | None]:
        """The entry ``key`` found or copied (the caller holds its lock); or why not."""
        self._clear_tmp(key)
        entry = self.entries / key
        staged_path = entry / source.name
        if entry.is_dir():
            os.utime(entry)  # most recently used
            say(f"staging: reusing {staged_path} (0 bytes copied)")
            return Staged(staged_path, 0, time.monotonic() - started, key), None
        note = self._make_room(size, keep=key)
        if note is not None:
            return None, note
        try:
            copied = self._copy(source, key, size, progress)
        except OSError as exc:
            return None, f"copying into {self.root} failed: {exc.strerror or exc}"
        seconds = time.monotonic() - started
        mb_s = copied / 1e6 / seconds if seconds > 0 else 0.0
        say(f"staging: copied {copied} bytes to {staged_path} in {seconds:.2f}s ({mb_s:.0f} MB/s)")
        return Staged(staged_path, copied, seconds, key), None

    def _copy(self, source: Path, key: str, size: int, progress: Progress | None) -> int:
        """Copy ``source`` into ``tmp/``, then rename the whole into ``entries/<key>``."""
        work = self.tmp / f"{key}.{secrets.token_hex(4)}"
        work.mkdir(mode=0o700)
        try:
            copied = _copy_tree(source, work / source.name, progress)
            meta = {"source": str(source.resolve()), "bytes": size, "staged_at": time.time()}
            (work / ".mt-entry.json").write_text(json.dumps(meta), encoding="utf-8")
            os.rename(work, self.entries / key)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return copied

    def _clear_tmp(self, key: str) -> None:
        """Remove copies of ``key`` left by a job killed mid-copy (the caller holds the
        key's lock, so no copy of it is in progress)."""
        for leftover in self.tmp.glob(f"{key}.*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def usage(self) -> list[tuple[float, str, int]]:
        """Every entry as (last use, key, bytes), least recently used first."""
        found = []
        for entry in self.entries.iterdir():
            meta = entry / ".mt-entry.json"
            try:
                size = int(json.loads(meta.read_text(encoding="utf-8"))["bytes"])
                found.append((entry.stat().st_mtime, entry.name, size))
            except (OSError, ValueError, KeyError):
                continue  # not ours, or removed meanwhile
        return sorted(found)

    def _make_room(self, size: int, *, keep: str) -> str | None:
        """Evict unused entries, least recently used first, until ``size`` more bytes fit
        under ``max_bytes`` and in the free space; None if they fit, else why not."""
        if self.max_bytes is not None and size > self.max_bytes:
            return f"the weights ({size} bytes) exceed staging.max_bytes ({self.max_bytes})"
        entries = self.usage()
        used = sum(n for _, _, n in entries)
        free = shutil.disk_usage(self.root).free

        def fits() -> bool:
            capped = self.max_bytes is None or used + size <= self.max_bytes
            return capped and size <= free

        for _, victim, victim_size in entries:
            if fits():
                break
            if victim != keep and self._evict(victim):
                used -= victim_size
                free += victim_size
        if fits():
            return None
        return (
            f"no room for {size} bytes in {self.root} ({free} free, {used} bytes in entries "
            "that running jobs use)"
        )

    def _evict(self, key: str) -> bool:
        """Remove entry ``key`` unless a job stages or uses it; True if it was removed."""
        lock = _try_lock(self.locks / f"{key}.lock", fcntl.LOCK_EX)
        if lock is None:
            return False
        with lock:
            use = _try_lock(self.locks / f"{key}.use", fcntl.LOCK_EX)
            if use is None:
                return False  # a running job reads it
            with use:
                doomed = self.tmp / f"{key}.evicted.{secrets.token_hex(4)}"
                try:
                    os.rename(self.entries / key, doomed)  # gone at once for every reader
                except FileNotFoundError:
                    return False
                shutil.rmtree(doomed, ignore_errors=True)
        return True


def _copy_tree(source: Path, target: Path, progress: Progress | None) -> int:
    """Copy a file or folder (regular files and folders only), keeping mtimes; bytes copied."""
    if source.is_file():
        return _copy_file(source, target, progress, 0)
    copied = 0
    target.mkdir(mode=0o700)
    for rel, _ in _files(source):
        (target / rel).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        copied = _copy_file(source / rel, target / rel, progress, copied)
    return copied


def _copy_file(source: Path, target: Path, progress: Progress | None, done: int) -> int:
    """Copy one file in chunks; ``done`` plus its size."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    with source.open("rb") as src, os.fdopen(os.open(target, flags, 0o600), "wb") as dst:
        while chunk := src.read(CHUNK_BYTES):
            dst.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)
    info = source.stat()
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    return done


def stage_weights(
    source: str,
    *,
    dir_setting: str,
    max_bytes: int | None,
    environ: Mapping[str, str],
    say: Callable[[str], None],
    progress: Progress | None = None,
) -> tuple[Staged, IO[bytes] | None]:
    """Stage the spec's ``weights.source`` on this node (the job wrapper's one call).

    A source that is no local path (a Hugging Face repo id: the engine downloads it) or that
    this node does not see is not staged: the result's note says so.
    """
    path = Path(source).expanduser()
    if not path.exists():
        note = f"weights {source!r} are no path on this node"
        say(f"staging: not staged: {note}")
        return Staged(path, 0, 0.0, None, note), None
    cache = NodeCache(cache_root(dir_setting, environ), max_bytes=max_bytes)
    try:
        return cache.stage(path, say=say, progress=progress)
    except OSError as exc:
        # A node-local disk that is full, read-only or gone must not cost the job: the
        # engine can still read the source.
        note = f"the cache in {cache.root} cannot be used: {exc.strerror or exc}"
    except StagingError as exc:
        # Nor can another user who squats the cache's name stop this user's jobs.
        note = f"{exc.message}; {exc.hint}"
    say(f"staging: serving the weights from {source}: {note}")
    return Staged(path, 0, 0.0, None, note), None


def stage_spec(
    plan: JobPlan, phases: Phases | None, environ: Mapping[str, str], say: Callable[[str], None]
) -> tuple[ModelSpec, Phases, IO[bytes] | None]:
    """The plan's spec with its weights staged on this node if the plan asks (``weights.source``
    the copy), ``phases`` with staging's fields, and the entry's ``use`` lock to hold while
    the engine runs; the spec as it is if the weights were not staged (the note says why)."""
    spec, phases = plan.spec, phases or Phases()
    if plan.staging is None:
        return spec, phases, None
    staged, use = stage_weights(
        spec.weights.source,
        dir_setting=plan.staging.dir,
        max_bytes=plan.staging.max_bytes,
        environ=environ,
        say=say,
    )
    mb_s = staged.mb_s
    fields: dict[str, object] = {
        "staging_s": round(staged.seconds, 3),
        "staging_bytes": staged.bytes_copied,
        "staging_mb_s": None if mb_s is None else round(mb_s, 1),
        "staged_path": None if staged.note else str(staged.path),
        "staging_note": staged.note,
    }
    phases = phases.model_copy(update=fields)
    if staged.note is not None:
        return spec, phases, None
    weights = spec.weights.model_copy(update={"source": str(staged.path)})
    return spec.model_copy(update={"weights": weights}), phases, use
