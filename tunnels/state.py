"""What `mt tunnel status` and `mt tunnel close` know: one JSON file per open tunnel.

``$MT_HOME/tunnels/<local_port>.json`` (directory 0700, files 0600, written atomically by
hpc.privatefile) is written by the process that holds the tunnel once it is up, updated
on every state change, and removed when it ends. A file whose process is gone is stale:
listed as such and removed by ``close``. A background tunnel that cannot come up leaves
its record in state ``failed`` with the error, for the command that started it to report
and remove.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import psutil
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hpc.privatefile import write_private
from hpc.site import mt_home


class TunnelFailure(BaseModel):
    """Why a background tunnel could not come up: its error, for the command that started it."""

    model_config = ConfigDict(extra="forbid")

    message: str
    hint: str | None = None


class TunnelRecord(BaseModel):
    """One tunnel held by process ``pid``."""

    model_config = ConfigDict(extra="forbid")

    local_port: int = Field(gt=0, lt=65536)
    remote_port: int = Field(gt=0, lt=65536)
    host: str
    engine: str
    pid: int = Field(gt=0)
    url: str
    state: str
    reconnects: int = 0
    started_at: float = Field(default_factory=time.time)
    log_file: str | None = None
    control_path: str | None = None
    failure: TunnelFailure | None = None  # set with state "failed" by a background tunnel
    # Up, but without the owner key (tunnels.access): why, for a background tunnel's starter.
    notice: TunnelFailure | None = None

    def alive(self) -> bool:
        """Whether the process holding the tunnel still runs."""
        try:
            proc = psutil.Process(self.pid)
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def tunnels_dir(home: Path | None = None) -> Path:
    """``$MT_HOME/tunnels``."""
    return (home or mt_home()) / "tunnels"


class TunnelStates:
    """The state directory of open tunnels."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, local_port: int) -> Path:
        """The record file of the tunnel on ``local_port``."""
        return self.directory / f"{local_port}.json"

    def write(self, record: TunnelRecord) -> None:
        """Create or replace the record (atomically, 0600)."""
        write_private(self.path(record.local_port), record.model_dump_json(indent=2).encode())

    def read(self, local_port: int) -> TunnelRecord | None:
        """The record on ``local_port``, or None."""
        try:
            return TunnelRecord.model_validate_json(self.path(local_port).read_bytes())
        except (FileNotFoundError, ValidationError):
            return None

    def records(self) -> list[TunnelRecord]:
        """Every readable record, by local port."""
        out = []
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(OSError, ValidationError):
                out.append(TunnelRecord.model_validate_json(path.read_bytes()))
        return sorted(out, key=lambda r: r.local_port)

    def remove(self, local_port: int, *, pid: int | None = None) -> None:
        """Remove the record (only if ``pid`` still owns it, when given)."""
        if pid is not None:
            current = self.read(local_port)
            if current is not None and current.pid != pid:
                return
        with contextlib.suppress(FileNotFoundError):
            self.path(local_port).unlink()
