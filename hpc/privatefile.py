"""Writing a private file so that readers see the old version or the new one, never a part.

tmp file (0600, O_EXCL) in the same directory + write + fsync, then rename (or link, to
create only if absent) + fsync of the directory. Rename and link are atomic on POSIX
filesystems, NFS included. The registry, the keys file and job plans all write this way.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TMP_SUFFIX = ".tmp"


def make_private_dir(path: Path) -> None:
    """Create ``path`` and every missing parent 0700.

    ``Path.mkdir(mode=0o700, parents=True)`` gives the parents it creates the umask's mode
    (0755 under umask 022): a fresh ``$MT_HOME`` made that way would be one that `mt`
    then refuses (hpc.permissions). An existing directory is left as it is.
    """
    missing: list[Path] = []
    while not os.path.lexists(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another writer made it first
            directory.mkdir(mode=0o700)


def write_private(path: Path, data: bytes, *, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` (0600; the directory is created 0700 if missing).

    With ``replace=False`` the file is only created: False if it already existed (nothing
    is changed then). Raises OSError; the tmp file never outlives a failure here (a writer
    killed mid-write leaves a ``.tmp`` file that readers ignore and cleaners remove).
    """
    directory = path.parent
    make_private_dir(directory)
    tmp = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    created = True
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                created = False
            tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return created
