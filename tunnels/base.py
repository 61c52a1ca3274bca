"""What a tunnel is: its spec, its status, the TunnelEngine Protocol every engine implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from hpc.errors import MTError

State = Literal["connecting", "up", "down", "failed", "closed"]
Events = Callable[[str], None]  # one line of news for the user: "down: …", "up again"


@dataclass(frozen=True)
class TunnelSpec:
    """127.0.0.1:``local_port`` here → 127.0.0.1:``remote_port`` on ``host`` (via ``jump``)."""

    host: str  # [user@]host[:port] or an ~/.ssh/config alias
    local_port: int = 8081
    remote_port: int = 8081
    jump: str | None = None  # ProxyJump: [user@]host[:port], comma-separated
    identity: Path | None = None
    known_hosts: Path | None = None  # default: the ssh config's, else ~/.ssh/known_hosts
    ssh_config: Path | None = None  # default: ~/.ssh/config
    accept_new: bool = False  # OpenSSH's accept-new: add an unknown key once, then pin it
    keepalive_s: int = 15
    keepalive_count: int = 3
    connect_timeout_s: float = 15.0
    backoff_max_s: float = 30.0
    # The gateway owner's key file on the login node, a path there (``~/`` allowed); None:
    # hpc.ownerkey.REMOTE_OWNER_KEY, that is $MT_HOME/gateway/owner.key as its shell sees it.
    owner_key: str | None = None

    @property
    def url(self) -> str:
        """The local base URL of the gateway."""
        return f"http://127.0.0.1:{self.local_port}"


@dataclass(frozen=True)
class RemoteOutput:
    """What a command run on the login node over the tunnel's connection gave back."""

    code: int
    stdout: bytes = field(repr=False)  # may hold a secret (the owner key): never shown
    stderr: str = ""


class TunnelStatus:
    """What every engine reports of itself; engines set the three fields as things happen."""

    def __init__(self) -> None:
        self._state: State = "connecting"
        self._error: MTError | None = None
        self._reconnects = 0

    @property
    def state(self) -> State:
        """Where the tunnel is now."""
        return self._state

    @property
    def error(self) -> MTError | None:
        """Why reconnecting stopped, if it did."""
        return self._error

    @property
    def reconnects(self) -> int:
        """Connections made again after a drop."""
        return self._reconnects


class TunnelEngine(Protocol):
    """One forwarded port, kept up: connect once (errors raised), then reconnect on drops."""

    name: str
    spec: TunnelSpec

    def open(self) -> None:
        """Connect and listen on 127.0.0.1; raises MTError (auth, host key, port in use)."""

    def close(self) -> None:
        """Stop forwarding and release the port; idempotent."""

    def run_remote(self, command: str, *, timeout_s: float) -> RemoteOutput:
        """Run ``command`` (one POSIX shell string) on the login node over the tunnel's own
        connection, once it is up (no second login, no second 2FA code); TunnelError if it
        cannot run. The command names paths, never secrets: it is visible in `ps` there."""

    @property
    def state(self) -> State:
        """Where the tunnel is now."""

    @property
    def error(self) -> MTError | None:
        """Why the tunnel is ``failed`` (reconnecting stopped), else None."""

    @property
    def reconnects(self) -> int:
        """How many times the connection was made again after a drop."""
