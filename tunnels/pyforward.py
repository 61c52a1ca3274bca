"""The pure-Python engine: a small paramiko port forwarder on an hpc.ssh.connection link.

Not sshtunnel: it cannot check a host key against known_hosts (it takes one key, or none),
does not nest ProxyJump channels, and does not import with paramiko 4+ (``DSSKey``).
hpc.ssh.connection.SSHConnection already resolves ``~/.ssh/config`` (HostName, User, Port,
IdentityFile, ProxyJump), refuses unknown and changed host keys with their fingerprints,
and translates paramiko's errors; this module adds the listener and the forwarding.

Each local connection is one ``direct-tcpip`` channel to 127.0.0.1:remote_port on the
login node, pumped by its own thread. Keyboard-interactive prompts of the first login
(a 2FA code) are answered on the terminal when there is one (hpc.ssh.auth); reconnects
never prompt. A watcher thread probes the connection every
``keepalive_s`` (a global request the server must answer); ``keepalive_count`` missed
answers, or a closed transport, mark the tunnel down. While it is down, the listener
answers every connection with 503 at once (tunnels.outage), and the watcher reconnects
with bounded, jittered backoff; an authentication or host-key failure stops it.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

import paramiko

from hpc.errors import SSHError
from hpc.ssh.auth import interactive_prompter
from hpc.ssh.connection import SSHConnection
from hpc.ssh.exec import exec_on
from tunnels.backoff import Backoff, permanent
from tunnels.base import Events, RemoteOutput, TunnelSpec, TunnelStatus
from tunnels.errors import TunnelDownError, TunnelError
from tunnels.localport import bind_local
from tunnels.outage import answer_down

_CHUNK = 65536
_WATCH_S = 0.25


class ParamikoTunnel(TunnelStatus):
    """TunnelEngine over paramiko: no ``ssh`` binary needed."""

    name = "paramiko"

    def __init__(self, spec: TunnelSpec, events: Events) -> None:
        super().__init__()
        self.spec = spec
        self._events = events
        self._link = SSHConnection(
            spec.host,
            key_filename=spec.identity,
            known_hosts=spec.known_hosts,
            ssh_config=spec.ssh_config,
            connect_timeout_s=spec.connect_timeout_s,
            proxy_jump=spec.jump,
            accept_new=spec.accept_new,
            keepalive_s=spec.keepalive_s,
            # The first login may ask (a 2FA code typed on the terminal); see open().
            prompter=interactive_prompter(),
        )
        self._listener: socket.socket | None = None
        self._transport: paramiko.Transport | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- TunnelEngine ------------------------------------------------------------------
    def open(self) -> None:
        """Bind 127.0.0.1:local_port, connect (errors raised as they are), start forwarding."""
        self._listener = bind_local(self.spec.local_port)
        try:
            self._transport = self._link.transport()
        except BaseException:
            self._listener.close()
            self._link.close()
            raise
        # Reconnects never prompt: nobody may be watching, and a loop of 2FA prompts is what
        # must not happen. A server that asks again stops the tunnel with a clear error.
        self._link.prompter = None
        self._state = "up"
        self._threads = [
            threading.Thread(
                target=self._accept, args=(self._listener,), name="mt-tunnel-accept", daemon=True
            ),
            threading.Thread(target=self._watch, name="mt-tunnel-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Stop: release the port and the SSH connection."""
        if self._state == "closed":
            return
        self._stop.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        self._link.close()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._state != "failed":
            self._state = "closed"

    def run_remote(self, command: str, *, timeout_s: float) -> RemoteOutput:
        """An exec channel on the forwarding connection: no second login."""
        transport = self._transport
        if self._state != "up" or transport is None or not transport.is_active():
            raise TunnelError(
                f"the tunnel to {self.spec.host} is not up",
                local_port=self.spec.local_port,
                hint="wait for `tunnel up`, then try again",
            )
        try:
            code, out, err = exec_on(transport, command, timeout_s=timeout_s)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TunnelError(
                f"cannot run a command on {self.spec.host} over the tunnel: {exc}",
                local_port=self.spec.local_port,
                hint="the login node's sshd must allow sessions (not only port forwarding)",
            ) from exc
        return RemoteOutput(code, out, err.decode("utf-8", "replace"))

    # -- forwarding --------------------------------------------------------------------
    def _down_message(self) -> str:
        why = f": {self._error.message}" if self._error else "; reconnecting"
        return f"the SSH tunnel to {self.spec.host} is down{why}"

    def _accept(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            transport = self._transport
            if self._state != "up" or transport is None or not transport.is_active():
                threading.Thread(
                    target=answer_down, args=(conn, self._down_message()), daemon=True
                ).start()
                continue
            threading.Thread(
                target=self._forward, args=(conn, peer, transport), daemon=True
            ).start()

    def _forward(
        self, conn: socket.socket, peer: tuple[str, int], transport: paramiko.Transport
    ) -> None:
        try:
            channel = transport.open_channel(
                "direct-tcpip",
                ("127.0.0.1", self.spec.remote_port),
                peer,
                timeout=self.spec.connect_timeout_s,
            )
        except (paramiko.SSHException, OSError, EOFError) as exc:
            # The login node refused (nothing listens on remote_port), or the link dropped.
            answer_down(
                conn,
                f"the SSH tunnel to {self.spec.host} is up, but 127.0.0.1:"
                f"{self.spec.remote_port} there did not accept the connection ({exc})",
            )
            return
        try:
            _pump(conn, channel, self._stop)
        finally:
            channel.close()
            conn.close()

    # -- keeping it up -----------------------------------------------------------------
    def _alive(self, transport: paramiko.Transport) -> bool:
        """Whether the server answers a global request within the keepalive window."""
        answered = threading.Event()

        def ask() -> None:
            with contextlib.suppress(paramiko.SSHException, OSError, EOFError):
                transport.global_request("keepalive@openssh.com", wait=True)
            answered.set()

        threading.Thread(target=ask, name="mt-tunnel-keepalive", daemon=True).start()
        answered.wait(self.spec.keepalive_s * self.spec.keepalive_count)
        return answered.is_set() and transport.is_active()

    def _watch(self) -> None:
        backoff = Backoff(max_s=self.spec.backoff_max_s)
        since_probe = 0.0
        while not self._stop.wait(_WATCH_S):
            transport = self._transport
            since_probe += _WATCH_S
            alive = transport is not None and transport.is_active()
            if alive and transport is not None and since_probe >= self.spec.keepalive_s:
                since_probe = 0.0
                alive = self._alive(transport)
            if alive:
                continue
            self._state = "down"
            self._events(f"down: lost the connection to {self.spec.host}; reconnecting")
            self._link.close()
            if not self._reconnect(backoff):
                return
            since_probe = 0.0

    def _reconnect(self, backoff: Backoff) -> bool:
        while not self._stop.is_set():
            delay = backoff.next_s()
            if self._stop.wait(delay):
                return False
            try:
                self._transport = self._link.transport()
            except SSHError as exc:
                if permanent(exc):
                    self._fail(exc)
                    return False
                self._events(f"down: {exc.message}; next try in about {backoff.next_s():.0f}s")
                backoff.attempt -= 1  # the peek above must not lengthen the real wait
                continue
            self._reconnects += 1
            self._state = "up"
            backoff.reset()
            self._events(f"up: reconnected to {self.spec.host}")
            return True
        return False

    def _fail(self, exc: SSHError) -> None:
        self._error = TunnelDownError(
            f"the tunnel to {self.spec.host} dropped and cannot reconnect: {exc.message}",
            local_port=self.spec.local_port,
            hint=exc.hint,
        )
        self._state = "failed"
        self._events(f"failed: {exc.message}")


def _pump(conn: socket.socket, channel: paramiko.Channel, stop: threading.Event) -> None:
    """Copy bytes both ways until either side closes (half-closes are passed on)."""
    local_open, remote_open = True, True
    while (local_open or remote_open) and not stop.is_set():
        waiting = [s for s, live in ((conn, local_open), (channel, remote_open)) if live]
        readable, _, _ = select.select(waiting, [], [], 1.0)
        if channel.closed:
            return
        for source in readable:
            try:
                data = source.recv(_CHUNK)
            except OSError:
                return
            if source is conn:
                if not data:
                    local_open = False
                    channel.shutdown_write()
                else:
                    channel.sendall(data)
            elif not data:
                remote_open = False
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_WR)
            else:
                try:
                    conn.sendall(data)
                except OSError:
                    return
