"""Tunnel errors, in the MTError tree (hpc/errors.py) so the CLI prints ``error:``/``hint:``.

    MTError
    └── TunnelError             the tunnel could not be opened or kept: names the local port
        ├── LocalPortInUseError     127.0.0.1:PORT is taken: names the process if visible
        ├── TunnelDownError         the tunnel dropped and cannot come back (auth, host key)
        └── OwnerKeyError           the gateway owner's key cannot be read on the login node

SSH errors (unknown/changed host key, auth) are hpc.errors.SSHError and its subclasses,
raised unchanged: the same errors `mt --host` gives.
"""

from __future__ import annotations

from hpc.errors import MTError


class TunnelError(MTError):
    """The tunnel on ``local_port`` could not be opened or kept."""

    def __init__(self, message: str, *, local_port: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.local_port = local_port


class LocalPortInUseError(TunnelError):
    """Another process listens on 127.0.0.1:``local_port``."""

    def __init__(self, local_port: int, holder: str | None) -> None:
        who = f" by {holder}" if holder else ""
        super().__init__(
            f"local port {local_port} is already in use{who}",
            local_port=local_port,
            hint=f"choose another with `--local-port`, or stop what holds {local_port} "
            "(`mt tunnel status` lists ModelTainer's own tunnels, `mt tunnel close` ends them)",
        )
        self.holder = holder


class TunnelDownError(TunnelError):
    """The tunnel dropped and reconnecting stopped (authentication or host key refused)."""


class OwnerKeyError(TunnelError):
    """The tunnel is up, but the gateway owner's key could not be read on the login node.

    Not fatal: the tunnel stays up (a gateway with ``--keys`` takes other keys), and the
    CLI shows this as a warning with its hint.
    """
