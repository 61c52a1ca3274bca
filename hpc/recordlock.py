"""A per-record lock that holds on a shared filesystem, NFS included: the link-count method.

``O_CREAT | O_EXCL`` is not atomic on every NFS client, so the lock is taken the way
open(2) recommends instead: write a file under a unique name
(``.<key>.lock.<host>.<pid>.<rand>``), ``link`` it to ``<key>.lock``, and hold the lock
iff the link succeeded or the unique file's link count is 2 afterwards (a link whose reply
was lost still counts). Releasing unlinks both names. The lock file says who holds it
(host, boot, pid, since when), so a lock is broken when its holder is dead on this host or
it is older than ``stale_s`` (a holder keeps it for one read and one write: milliseconds).
Breaking renames the lock aside first and checks it was the one judged stale, so two
processes breaking the same stale lock cannot remove a third one's fresh lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc.errors import RegistryError
from hpc.liveness import alive, boot_id, judged_here, this_host

LOCK_SUFFIX = ".lock"
STALE_S = 30.0
WAIT_S = 10.0
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_TAG = re.compile(r"[A-Za-z0-9_-]+\.[0-9]+\.[0-9a-f]+")


def _is_unique_name(name: str, lock_name: str) -> bool:
    """True for ``.<key>.lock.<host>.<pid>.<rand>``: a holder's own name for ``lock_name``."""
    tag = name.removeprefix(f".{lock_name}.")
    return tag != name and _TAG.fullmatch(tag) is not None


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its lock file says (empty if it could not say: a full disk)."""

    host: str | None
    boot: str | None
    pid: int | None
    since: float
    ino: int
    unique: str | None = None  # the holder's own name for the lock file

    def describe(self) -> str:
        """``pid 123 on gpu1 for 4s``, for error messages."""
        who = f"pid {self.pid} on {self.host}" if self.pid is not None else "an unknown process"
        return f"{who} for {max(0.0, time.time() - self.since):.0f}s"


def lock_path(directory: Path, key: str) -> Path:
    """The lock file of record ``key``."""
    return directory / f"{key}{LOCK_SUFFIX}"


def _read_holder(path: Path) -> Holder | None:
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        host, boot, pid = str(data["host"]), data.get("boot_id"), int(data["pid"])
        unique = str(data["name"]) if "name" in data else None
        # The later of its own clock and the link's (ctime): a holder that waited for
        # the lock wrote "since" before it took it.
        since = max(float(data["since"]), st.st_ctime)
    except (ValueError, KeyError, TypeError):
        host, boot, pid, since, unique = None, None, None, st.st_ctime, None
    return Holder(host, boot, pid, since, st.st_ino, unique)


def stale(holder: Holder, stale_s: float = STALE_S) -> bool:
    """True if ``holder`` cannot still be using its lock: dead here, or older than ``stale_s``."""
    if time.time() - holder.since > stale_s:
        return True
    if holder.pid is not None and judged_here(holder.host, holder.boot):
        return not alive(holder.pid)
    return False


def break_lock(path: Path, holder: Holder) -> int:
    """Remove the lock at ``path`` (and its holder's own name for it) if it is still the one
    ``holder`` describes; returns how many files that removed."""
    grave = path.with_name(f".{path.name}.broken.{secrets.token_hex(6)}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return 0  # released or broken by someone else meanwhile
    try:
        if os.stat(grave).st_ino != holder.ino:
            # A fresh lock taken after our look: give it back, unless the name is taken again.
            with contextlib.suppress(FileExistsError):
                os.link(grave, path)
            return 0
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(grave)
    removed = 1
    # Only a name of this lock's own kind, never anything else a lock file might name.
    if holder.unique is not None and _is_unique_name(holder.unique, path.name):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.with_name(holder.unique))
            removed += 1
    return removed


class RecordLock:
    """The lock of one record; use :func:`record_lock` (a context manager)."""

    def __init__(self, directory: Path, key: str, *, stale_s: float = STALE_S) -> None:
        self.path = lock_path(directory, key)
        self.stale_s = stale_s
        tag = f"{_SAFE.sub('_', this_host())}.{os.getpid()}.{secrets.token_hex(4)}"
        self.unique = directory / f".{key}{LOCK_SUFFIX}.{tag}"

    def _write_unique(self) -> None:
        body = {
            "host": this_host(),
            "boot_id": boot_id(),
            "pid": os.getpid(),
            "since": time.time(),
            "name": self.unique.name,
        }
        fd = os.open(self.unique, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # A full disk may refuse even these bytes: an empty lock file still locks, and
            # goes stale by its age alone.
            with contextlib.suppress(OSError):
                os.write(fd, json.dumps(body).encode())
        finally:
            os.close(fd)

    def _holds(self) -> bool:
        with contextlib.suppress(FileExistsError):
            os.link(self.unique, self.path)
        return os.stat(self.unique).st_nlink == 2

    def acquire(self, wait_s: float = WAIT_S) -> None:
        """Take the lock, breaking a stale one; RegistryError if it is not free within wait_s."""
        self._write_unique()
        deadline = time.monotonic() + wait_s
        delay = 0.002
        try:
            while not self._holds():
                holder = _read_holder(self.path)
                if holder is not None and stale(holder, self.stale_s):
                    break_lock(self.path, holder)
                    continue
                if time.monotonic() >= deadline:
                    who = holder.describe() if holder is not None else "another process"
                    raise RegistryError(
                        f"record lock {self.path} is held by {who}; gave up after {wait_s:g}s",
                        path=self.path,
                        hint="another mt command or job is writing this record: try again; "
                        f"a lock older than {self.stale_s:g}s is broken automatically",
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unique)
            raise

    def release(self) -> None:
        """Give the lock up (and never remove a lock someone else took after breaking ours).

        Never raises: a lock left on a filesystem remounted read-only is broken later (its
        holder dead, or old)."""
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(self.path), os.stat(self.unique)):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.unlink(self.unique)


@contextlib.contextmanager
def record_lock(
    directory: Path, key: str, *, wait_s: float = WAIT_S, stale_s: float = STALE_S
) -> Iterator[None]:
    """Hold record ``key``'s lock in ``directory`` for the block."""
    lock = RecordLock(directory, key, stale_s=stale_s)
    lock.acquire(wait_s)
    try:
        yield
    finally:
        lock.release()


def clean_locks(directory: Path, older_than_s: float, *, stale_s: float = STALE_S) -> int:
    """Break stale record locks and remove lock files killed holders left (older than
    ``older_than_s``); returns how many files it removed."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    cutoff = time.time() - older_than_s
    for entry in entries:
        name = entry.name
        if name.endswith(LOCK_SUFFIX) and not name.startswith("."):
            holder = _read_holder(Path(entry.path))
            if holder is not None and stale(holder, stale_s):
                with contextlib.suppress(OSError):  # a read-only registry: leave it
                    removed += break_lock(Path(entry.path), holder)
        elif name.startswith(".") and LOCK_SUFFIX + "." in name:
            # A holder's unique name (or a breaker's grave) whose owner was killed.
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
    return removed
