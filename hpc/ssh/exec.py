"""Commands on the login node over SSH: how `mt --host <login>` runs Slurm's tools.

``SSHTransport`` implements the Transport Protocol of hpc.transport. Each ``run`` is one
exec channel on a single hpc.ssh.connection link, made by the first ``run`` and kept until
``close()`` (the CLI closes it when the command ends; a link that dropped is made again by
the next ``run``). The command travels as one string, ``shlex.join(argv)``: sshd hands it to
the user's login shell, so every argument is quoted and the far side sees the same argv.
That shell must be POSIX-like (bash, zsh, dash, ksh); csh and fish parse quotes otherwise.

Where to connect, host keys and logins are hpc.ssh.connection's (ssh config, ProxyJump,
known_hosts, keys then prompts); failures become hpc.errors.SSHError in hpc.ssh.failures.
"""

from __future__ import annotations

import errno
import re
import select
import shlex
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import paramiko

from hpc.site import SlurmSite
from hpc.ssh.auth import interactive_prompter
from hpc.ssh.connection import LinkOptions, SSHConnection
from hpc.ssh.failures import ConnectionLost, closed_error, exec_error
from hpc.ssh.target import SSHTarget
from hpc.transport import CommandResult, CommandTimeout

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

COMMAND_NOT_FOUND = 127  # what sh (and `env`) exit with when the command does not exist
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK = 65536
_POLL_S = 0.05


class Sink(Protocol):
    """Where :meth:`SSHTransport.relay` copies a command's output (a binary stream)."""

    def write(self, data: bytes, /) -> int:
        """Write ``data``."""
        ...

    def flush(self) -> None:
        """Pass it on now."""
        ...


class SSHTransport:
    """Runs commands on a login node over one reused, host-key-checked SSH connection."""

    def __init__(
        self,
        host: str,
        *,
        remote_env: Mapping[str, str] | None = None,
        **options: Unpack[LinkOptions],
    ) -> None:
        bad = [name for name in (remote_env or {}) if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        self.remote_env = dict(remote_env or {})
        self.link = SSHConnection(host, **options)

    @property
    def target(self) -> SSHTarget:
        """The login node, resolved from the arguments and the ssh config (read once)."""
        return self.link.target

    @property
    def connections(self) -> int:
        """Connections made so far: one per `mt` command, unless one dropped."""
        return self.link.connections

    def command_line(self, argv: list[str]) -> str:
        """The shell string sent for ``argv``: each word quoted, after an ``env`` prefix if any."""
        if not argv:
            raise ValueError("empty argv")
        prefix = (
            ["env", *(f"{k}={v}" for k, v in self.remote_env.items())] if self.remote_env else []
        )
        return shlex.join([*prefix, *argv])

    def connection(self) -> paramiko.Transport:
        """The live, host-key-checked connection to the login node (made now if needed)."""
        return self.link.transport()

    def close(self) -> None:
        """Close the connection (and any jump hosts); the next ``run`` connects again."""
        self.link.close()

    def __enter__(self) -> SSHTransport:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------------
    def run(self, argv: list[str], *, stdin: str | None = None, timeout_s: float) -> CommandResult:
        """Run ``argv`` on the login node, feeding ``stdin``, waiting at most ``timeout_s``.

        A command the remote shell cannot find (exit 127) raises FileNotFoundError, like a
        local one; a timeout raises CommandTimeout, and so does a connection that drops while
        the command runs (its outcome is unknown); SSHError when nothing could run.
        """
        command = self.command_line(argv)
        transport = self.link.transport()
        target = self.target
        deadline = time.monotonic() + timeout_s
        try:
            channel = transport.open_session(timeout=max(timeout_s, 1.0))
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise exec_error(exc, argv, target) from exc
        try:
            code, out, err = _exchange(channel, stdin, deadline)
        except _Expired:
            raise CommandTimeout(argv, timeout_s) from None
        finally:
            channel.close()
        # No exit status: a signal killed the command, or the connection dropped. sshd sends
        # EOF before it closes a channel; paramiko closes its channels before it marks a dead
        # connection inactive, so a missing EOF is the surer sign.
        if code == -1 and (not channel.eof_received or not transport.is_active()):
            raise ConnectionLost(argv, timeout_s, str(target))
        if code == COMMAND_NOT_FOUND:
            raise FileNotFoundError(
                errno.ENOENT, f"{argv[0]}: command not found on {target}", argv[0]
            )
        return CommandResult(
            argv, code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        )

    def relay(self, argv: list[str], *, stdin: bytes | None, out: Sink, err: Sink) -> int:
        """Run ``argv`` on the login node, copying its stdout and stderr to ``out`` and
        ``err`` as they arrive (a follow or a wait shows each line when it comes); its exit
        code. No timeout: the command ends itself, or the user stops it (Ctrl-C closes the
        channel). A connection that drops meanwhile raises SSHError; a command the remote
        shell cannot find (exit 127), FileNotFoundError.
        """
        command = self.command_line(argv)
        transport = self.link.transport()
        target = self.target
        try:
            channel = transport.open_session(timeout=self.link.connect_timeout_s)
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise exec_error(exc, argv, target) from exc
        try:
            while True:
                busy = False
                if channel.recv_ready():
                    out.write(channel.recv(_CHUNK))
                    out.flush()
                    busy = True
                if channel.recv_stderr_ready():
                    err.write(channel.recv_stderr(_CHUNK))
                    err.flush()
                    busy = True
                finished = channel.closed or (channel.eof_received and channel.exit_status_ready())
                if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if not busy:
                    select.select([channel], [], [], _POLL_S * 20)
        finally:
            channel.close()
        code = channel.recv_exit_status() if channel.exit_status_ready() else -1
        if code == -1:
            raise closed_error(target)
        if code == COMMAND_NOT_FOUND:
            raise FileNotFoundError(
                errno.ENOENT, f"{argv[0]}: command not found on {target}", argv[0]
            )
        return code


def exec_on(
    transport: paramiko.Transport, command: str, *, timeout_s: float
) -> tuple[int, bytes, bytes]:
    """Run the shell string ``command`` on an open connection (no stdin); its exit status
    (-1 if none came), stdout and stderr. For callers that hold their own connection, such
    as a tunnel; paramiko's errors and TimeoutError (past ``timeout_s``) are theirs to
    translate."""
    deadline = time.monotonic() + timeout_s
    channel = transport.open_session(timeout=max(timeout_s, 1.0))
    try:
        channel.exec_command(command)
        return _exchange(channel, None, deadline)
    except _Expired:
        raise TimeoutError(f"no answer within {timeout_s:g}s") from None
    finally:
        channel.close()


class _Expired(Exception):
    """The command's deadline passed."""


def _exchange(
    channel: paramiko.Channel, stdin: str | None, deadline: float
) -> tuple[int, bytes, bytes]:
    """Feed stdin while reading stdout and stderr (neither side can block the other)."""
    pending = memoryview(stdin.encode("utf-8")) if stdin else None
    if pending is None:
        channel.shutdown_write()  # the command sees end-of-input at once
    out, err = bytearray(), bytearray()
    while True:
        busy = False
        if pending is not None and channel.send_ready():
            try:
                sent = channel.send(bytes(pending[:_CHUNK]))
            except OSError:
                sent = 0  # the command exited without reading all its input
            pending = pending[sent:] if sent else None
            if not pending:
                pending = None
                if not channel.closed:
                    channel.shutdown_write()
            busy = True
        if channel.recv_ready():
            out += channel.recv(_CHUNK)
            busy = True
        if channel.recv_stderr_ready():
            err += channel.recv_stderr(_CHUNK)
            busy = True
        # sshd may send the exit status before the last output: wait for EOF as well.
        finished = channel.closed or (channel.eof_received and channel.exit_status_ready())
        if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
            return channel.recv_exit_status(), bytes(out), bytes(err)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Expired
        if not busy:
            # The channel's fileno is readable when stdout or stderr data (or the close) arrives.
            select.select([channel], [], [], min(remaining, _POLL_S))


def ssh_transport(slurm: SlurmSite) -> SSHTransport:
    """The SSHTransport that site.yaml's ``slurm.ssh_*`` settings (or `mt --host`) describe."""
    if not slurm.ssh_host:
        raise ValueError("slurm.ssh_host is not set")
    return SSHTransport(
        slurm.ssh_host,
        user=slurm.ssh_user,
        port=slurm.ssh_port,
        key_filename=slurm.ssh_identity,
        known_hosts=slurm.ssh_known_hosts,
        ssh_config=slurm.ssh_config,
        connect_timeout_s=slurm.ssh_connect_timeout_s,
        remote_env=slurm.ssh_env,
        # A 2FA code is asked for on the terminal; without one (cron, CI) the login fails.
        prompter=interactive_prompter(),
    )
