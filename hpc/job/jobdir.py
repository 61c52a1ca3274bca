"""The job's private directory on its node: 0700, removed when the job ends.

It holds what only the job may touch: the engine's Unix socket (other users cannot connect
to a socket in a directory they cannot enter, whatever the socket's own mode), the front's
TLS key and certificate, and key files an engine reads. It lives under ``$TMPDIR`` (a
node-local ``/tmp`` on most clusters, which Apptainer binds into the container) with a
short name: a Unix socket's path must fit in 108 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from hpc.errors import EngineError

ENGINE_SOCKET = "engine.sock"
_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux; leave room


class JobDir:
    """A fresh 0700 directory for one job (or one swap-pool slot)."""

    def __init__(self, prefix: str = "mt-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))  # mkdtemp makes it 0700
        info = self.path.stat()
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.getuid():
            raise EngineError(
                f"the job's private directory {self.path} is not private "
                f"(mode {stat.S_IMODE(info.st_mode):o})",
                hint="check $TMPDIR: mt needs a directory only this user can enter",
            )
        if len(str(self.socket_path())) > _MAX_SOCKET_PATH:
            self.remove()
            raise EngineError(
                f"the engine's socket path {self.socket_path()} is too long for a Unix socket",
                hint="set TMPDIR to a shorter directory (e.g. /tmp) for the job",
            )

    def socket_path(self, name: str = ENGINE_SOCKET) -> Path:
        """Where an engine listens: a Unix socket in this directory."""
        return self.path / name

    def remove(self) -> None:
        """Remove the directory and everything in it (sockets, keys); never raises."""
        with contextlib.suppress(OSError):
            shutil.rmtree(self.path)
