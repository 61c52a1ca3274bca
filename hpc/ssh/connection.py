"""One paramiko link to a host, through its ProxyJump hops, kept alive and made again if it drops.

What both SSH users share: hpc.ssh.exec runs commands on it, tunnels.pyforward forwards a
port over it. The host is resolved from ``~/.ssh/config`` (hpc.ssh.target), every hop's key
is checked against known_hosts (hpc.ssh.hostkeys), and logins go keys first, then the
server's prompts (hpc.ssh.auth): a prompt is answered by ``prompter``, and without one the
login fails at once. Each jump is a ``direct-tcpip`` channel through the previous host.
Not supported: ProxyCommand, host certificates (``@cert-authority``) and plain password
logins.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import paramiko

from hpc.ssh.auth import KeysThenPrompts, Prompter
from hpc.ssh.failures import closed_error, connect_error, jump_error, quiet_paramiko
from hpc.ssh.hostkeys import read_known_hosts, trust
from hpc.ssh.target import SSHTarget, jump_hops, load_ssh_config, resolve_target

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

KEEPALIVE_S = 30


class LinkOptions(TypedDict, total=False):
    """How to reach and log in to a host; each is optional (the ssh config fills the rest)."""

    user: str | None
    port: int | None
    key_filename: Path | None
    known_hosts: Path | None
    ssh_config: Path | None
    connect_timeout_s: float  # default 15
    proxy_jump: str | None  # overrides the config's ProxyJump (`-J`), comma-separated
    accept_new: bool  # OpenSSH's accept-new (hpc.ssh.hostkeys); default False
    keepalive_s: int  # default KEEPALIVE_S
    # Who answers keyboard-interactive prompts (a 2FA code): None means nobody (no
    # terminal), and such a login fails at once with a clear error.
    prompter: Prompter | None


class SSHConnection:
    """A host-key-checked SSH connection to ``host``: made on first use, again after a drop."""

    def __init__(self, host: str, **options: Unpack[LinkOptions]) -> None:
        self.host = host
        self.user = options.get("user")
        self.port = options.get("port")
        self.key_filename = options.get("key_filename")
        self.known_hosts = options.get("known_hosts")
        self.ssh_config = options.get("ssh_config")
        self.connect_timeout_s = options.get("connect_timeout_s", 15.0)
        self.proxy_jump = options.get("proxy_jump")
        self.accept_new = options.get("accept_new", False)
        self.keepalive_s = options.get("keepalive_s", KEEPALIVE_S)
        self.prompter = options.get("prompter")
        self.connections = 0  # connections made so far: one per `mt` command, unless one dropped
        self._lock = threading.Lock()
        self._clients: list[paramiko.SSHClient] = []  # jump hosts first, the target last
        self._target: SSHTarget | None = None
        self._config: paramiko.SSHConfig | None = None

    # -- where -------------------------------------------------------------------------
    def _ssh_config(self) -> paramiko.SSHConfig:
        if self._config is None:
            self._config = load_ssh_config(self.ssh_config, self.host)
        return self._config

    @property
    def target(self) -> SSHTarget:
        """The host, resolved from the arguments and the ssh config (read once)."""
        if self._target is None:
            self._target = resolve_target(
                self.host,
                self._ssh_config(),
                user=self.user,
                port=self.port,
                key=self.key_filename,
                known=self.known_hosts,
            )
        return self._target

    # -- connection --------------------------------------------------------------------
    def transport(self) -> paramiko.Transport:
        """The live connection to the host: made on first use, and again if it dropped."""
        with self._lock:
            if self._clients:
                live = self._clients[-1].get_transport()
                if live is not None and live.is_active():
                    return live
                self._close_clients()
            quiet_paramiko()
            hops = jump_hops(
                self.target,
                self._ssh_config(),
                proxy_jump=self.proxy_jump,
                key=self.key_filename,
                known=self.known_hosts,
            )
            chain = [*hops, self.target]
            sock: paramiko.Channel | None = None
            try:
                for i, hop in enumerate(chain):
                    client = self._open(hop, sock)
                    self._clients.append(client)
                    if i + 1 < len(chain):
                        sock = self._tunnel(client, hop, chain[i + 1])
            except BaseException:
                self._close_clients()
                raise
            transport = _live(self._clients[-1], self.target)
            transport.set_keepalive(self.keepalive_s)
            self.connections += 1
            return transport

    def _open(self, target: SSHTarget, sock: paramiko.Channel | None) -> paramiko.SSHClient:
        known = read_known_hosts(target)
        client = paramiko.SSHClient()
        trust(client, target, known, accept_new=self.accept_new)
        timeout = self.connect_timeout_s
        try:
            client.connect(
                target.hostname,
                port=target.port,
                username=target.user,
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                auth_strategy=KeysThenPrompts(
                    target.user,
                    target.identity_files,
                    agent=not target.identities_only,
                    home_keys=not target.identities_only,
                    prompter=self.prompter,
                ),
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise connect_error(exc, target, known, timeout) from exc
        except BaseException:
            client.close()
            raise
        return client

    def _tunnel(
        self, client: paramiko.SSHClient, via: SSHTarget, to: SSHTarget
    ) -> paramiko.Channel:
        transport = _live(client, via)
        try:
            return transport.open_channel(
                "direct-tcpip",
                (to.hostname, to.port),
                ("127.0.0.1", 0),
                timeout=self.connect_timeout_s,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise jump_error(exc, via, to) from exc

    def _close_clients(self) -> None:
        for client in reversed(self._clients):
            client.close()
        self._clients.clear()

    def close(self) -> None:
        """Close the connection (and any jump hosts); the next use connects again."""
        with self._lock:
            self._close_clients()


def _live(client: paramiko.SSHClient, target: SSHTarget) -> paramiko.Transport:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise closed_error(target)
    return transport
