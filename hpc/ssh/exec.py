"""Slurm commands on the login node over SSH (paramiko): how `mt --host <login>` works.

``SSHTransport`` implements the Transport Protocol of hpc.transport. Each ``run`` is one
exec channel on a single connection, made by the first ``run`` and kept until ``close()``
(the CLI closes it when the command ends; a connection that dropped is made again by the
next ``run``). The command travels as one string, ``shlex.join(argv)``: sshd hands it to
the user's login shell, so every argument is quoted and the far side sees the same argv.
That shell must be POSIX-like (bash, zsh, dash, ksh); csh and fish parse quotes otherwise.

Where to connect comes from ``~/.ssh/config`` (``paramiko.SSHConfig``), so an alias works:
HostName, User, Port, IdentityFile, IdentitiesOnly, UserKnownHostsFile and ProxyJump (each
jump is a ``direct-tcpip`` channel through the previous host, whose key is checked too; the
jump hosts' own ProxyJump lines are not followed). Arguments given here win over the config.
Keys, the agent and keyboard-interactive prompts (a 2FA code after the key) are tried as
OpenSSH tries them (hpc.ssh.auth); prompts are answered by the caller's ``prompter`` and,
without one, fail at once with a clear error. Not supported: ProxyCommand, host
certificates (``@cert-authority``) and plain password logins; for those, run `mt` on the
login node itself.

Host keys are checked against one known_hosts file and nothing else: an unknown key is
refused, showing its SHA256 fingerprint, and never added (``StrictHostKeyChecking`` in the
config is ignored) unless the caller opts in with ``accept_new=True`` (OpenSSH's
``accept-new``: the key is appended to that file, and from then on pinned); a changed key
is a hard failure naming the known_hosts line, with or without ``accept_new``.

Every paramiko and socket error is translated here, and only here, into hpc.errors.SSHError.
"""

from __future__ import annotations

import errno
import getpass
import hmac
import logging
import os
import re
import select
import shlex
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys, InvalidHostKey

from hpc.errors import (
    ChangedHostKeyError,
    SSHAuthError,
    SSHError,
    UnknownHostKeyError,
)
from hpc.ssh.auth import (
    KeysThenPrompts,
    Prompter,
    PromptNeeded,
    PromptRejected,
    interactive_prompter,
)
from hpc.transport import CommandResult, CommandTimeout

if TYPE_CHECKING:
    from hpc.site import SlurmSite

SSH_PORT = 22
COMMAND_NOT_FOUND = 127  # what sh (and `env`) exit with when the command does not exist
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOP = re.compile(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?$")
_CHUNK = 65536
_POLL_S = 0.05
_KEEPALIVE_S = 30


@dataclass(frozen=True)
class SSHTarget:
    """One SSH destination, resolved from the caller's arguments and the ssh config."""

    alias: str  # what the user wrote: an ~/.ssh/config Host, or a host name
    hostname: str
    port: int
    user: str
    identity_files: tuple[Path, ...]
    identities_only: bool
    known_hosts: Path
    proxy_jump: tuple[str, ...]  # hops, in order, as written in ProxyJump

    @property
    def known_hosts_name(self) -> str:
        """The host's name in known_hosts: ``host``, or ``[host]:port`` off port 22."""
        return self.hostname if self.port == SSH_PORT else f"[{self.hostname}]:{self.port}"

    def __str__(self) -> str:
        where = f"{self.user}@{self.hostname}:{self.port}"
        return where if self.alias == self.hostname else f"{self.alias} ({where})"


def _load_ssh_config(path: Path | None, host: str) -> paramiko.SSHConfig:
    chosen = (path or Path("~/.ssh/config")).expanduser()
    try:
        return paramiko.SSHConfig.from_path(str(chosen))
    except FileNotFoundError:
        if path is not None:
            raise SSHError(
                f"ssh config {chosen} does not exist",
                host=host,
                hint="fix slurm.ssh_config in site.yaml, or remove it to use ~/.ssh/config",
            ) from None
        return paramiko.SSHConfig()
    except (OSError, paramiko.SSHException, paramiko.ConfigParseError) as exc:
        raise SSHError(f"cannot read ssh config {chosen}: {exc}", host=host) from exc


def _resolve(
    host: str,
    config: paramiko.SSHConfig,
    *,
    user: str | None,
    port: int | None,
    key: Path | None,
    known: Path | None,
) -> SSHTarget:
    """Where ``host`` (``[user@]host[:port]`` or a config alias) is, and how to log in there.

    Explicit arguments win over the ssh config, and ``user@``/``:port`` in ``host`` win over
    ``user``/``port``; missing IdentityFile entries of the config are skipped, a missing
    ``key`` is an error.
    """
    written = _HOP.match(host)
    if written is not None:
        host = written["host"].strip("[]")
        user = written["user"] or user
        port = int(written["port"]) if written["port"] else port
    options = config.lookup(host)
    hostname = str(options.get("hostname") or host)
    try:
        real_port = port or int(options.get("port") or SSH_PORT)
    except ValueError:
        raise SSHError(
            f"ssh config: Port {options.get('port')!r} for {host} is not a number",
            host=hostname,
        ) from None
    identities: tuple[Path, ...]
    if key is not None:
        key = key.expanduser()
        if not key.is_file():
            raise SSHError(
                f"identity file {key} does not exist",
                host=hostname,
                port=real_port,
                hint="name your private key with `mt --identity PATH` or slurm.ssh_identity",
            )
        identities = (key,)
    else:
        found = (Path(p).expanduser() for p in options.get("identityfile", []))
        identities = tuple(p for p in found if p.is_file())
    if known is None:
        listed = str(options.get("userknownhostsfile") or "").split()
        known = Path(listed[0]) if listed and listed[0].lower() != "none" else None
    jump = str(options.get("proxyjump") or "")
    return SSHTarget(
        alias=host,
        hostname=hostname,
        port=real_port,
        user=user or str(options.get("user") or "") or getpass.getuser(),
        identity_files=identities,
        identities_only=str(options.get("identitiesonly", "no")).lower() == "yes",
        known_hosts=(known or Path("~/.ssh/known_hosts")).expanduser(),
        proxy_jump=() if jump.lower() in ("", "none") else tuple(jump.split(",")),
    )


@dataclass(frozen=True)
class _KnownHost:
    line: int
    entry: HostKeyEntry


def _read_known_hosts(target: SSHTarget) -> list[_KnownHost]:
    """The usable lines of the target's known_hosts file (OpenSSH format), numbered."""
    path = target.known_hosts
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SSHError(
            f"cannot read {path}: {exc.strerror}", host=target.hostname, port=target.port
        ) from exc
    out: list[_KnownHost] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        # Marker lines (@cert-authority, @revoked) are not supported: a key they name is not
        # trusted, so a revoked key is still refused as unknown.
        if not line or line.startswith(("#", "@")):
            continue
        try:
            entry = HostKeyEntry.from_line(line, number)
        except (paramiko.SSHException, InvalidHostKey):
            continue  # OpenSSH skips lines it cannot parse, too
        if entry is not None:
            out.append(_KnownHost(number, entry))
    return out


def _names(entry: HostKeyEntry, name: str) -> bool:
    for listed in entry.hostnames:
        if listed.startswith("|1|"):  # a hashed name (HashKnownHosts yes)
            if hmac.compare_digest(HostKeys.hash_host(name, listed), listed):
                return True
        elif listed == name:
            return True
    return False


class _UnknownHost(paramiko.SSHException):
    """Raised by the policy below; carries the refused key for the error message."""

    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(f"{name} not found in known_hosts")
        self.key = key


class _RefuseUnknownHosts(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the refused key so the error can show its fingerprint."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHost(hostname, key)


class _AcceptNewHosts(paramiko.MissingHostKeyPolicy):
    """OpenSSH's ``StrictHostKeyChecking accept-new``: append an unknown key, then pin it.

    Only reached for a host with no key at all in known_hosts; paramiko raises
    BadHostKeyException for a changed key before asking the policy.
    """

    def __init__(self, target: SSHTarget) -> None:
        self.target = target

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        path = self.target.known_hosts
        line = f"{self.target.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("ascii"))
        finally:
            os.close(fd)
        client.get_host_keys().add(hostname, key.get_name(), key)


def _key_type(key: paramiko.PKey) -> str:
    name = key.get_name()
    return name.removeprefix("ssh-") if name.startswith("ssh-") else name.split("-")[0]


class SSHTransport:
    """Runs commands on a login node over one reused, host-key-checked SSH connection."""

    def __init__(
        self,
        host: str,
        *,
        user: str | None = None,
        port: int | None = None,
        key_filename: Path | None = None,
        known_hosts: Path | None = None,
        ssh_config: Path | None = None,
        connect_timeout_s: float = 15.0,
        remote_env: Mapping[str, str] | None = None,
        proxy_jump: str | None = None,
        accept_new: bool = False,
        keepalive_s: int = _KEEPALIVE_S,
        prompter: Prompter | None = None,
    ) -> None:
        bad = [name for name in (remote_env or {}) if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(map(repr, bad))}")
        self.host = host
        self.user = user
        self.port = port
        self.key_filename = key_filename
        self.known_hosts = known_hosts
        self.ssh_config = ssh_config
        self.connect_timeout_s = connect_timeout_s
        self.remote_env = dict(remote_env or {})
        self.proxy_jump = proxy_jump  # overrides the config's ProxyJump (`-J`), comma-separated
        self.accept_new = accept_new
        self.keepalive_s = keepalive_s
        # Who answers keyboard-interactive prompts (a 2FA code): None means nobody (no
        # terminal), and such a login fails at once with a clear error.
        self.prompter = prompter
        self.connections = 0  # connections made so far: one per `mt` command, unless one dropped
        self._lock = threading.Lock()
        self._clients: list[paramiko.SSHClient] = []  # jump hosts first, the login node last
        self._target: SSHTarget | None = None
        self._config: paramiko.SSHConfig | None = None

    # -- where -------------------------------------------------------------------------
    def _ssh_config(self) -> paramiko.SSHConfig:
        if self._config is None:
            self._config = _load_ssh_config(self.ssh_config, self.host)
        return self._config

    @property
    def target(self) -> SSHTarget:
        """The login node, resolved from the arguments and the ssh config (read once)."""
        if self._target is None:
            self._target = _resolve(
                self.host,
                self._ssh_config(),
                user=self.user,
                port=self.port,
                key=self.key_filename,
                known=self.known_hosts,
            )
        return self._target

    def command_line(self, argv: list[str]) -> str:
        """The shell string sent for ``argv``: each word quoted, after an ``env`` prefix if any."""
        if not argv:
            raise ValueError("empty argv")
        prefix = (
            ["env", *(f"{k}={v}" for k, v in self.remote_env.items())] if self.remote_env else []
        )
        return shlex.join([*prefix, *argv])

    # -- connection --------------------------------------------------------------------
    def _hops(self) -> list[SSHTarget]:
        target = self.target
        hops: list[SSHTarget] = []
        jumps = tuple(self.proxy_jump.split(",")) if self.proxy_jump else target.proxy_jump
        for spec in jumps:
            hop = spec.strip()
            if not hop or any(c.isspace() for c in hop):
                raise SSHError(
                    f"ssh config: cannot read ProxyJump {spec!r} for {target.alias}",
                    host=target.hostname,
                    port=target.port,
                    hint="write it as [user@]host[:port], comma-separated for several jumps",
                )
            jump = _resolve(
                hop, self._ssh_config(), user=None, port=None, key=None, known=self.known_hosts
            )
            if self.key_filename is not None:
                # `--identity` is tried on the jump hosts too, first, as OpenSSH's `-i` is.
                key = self.key_filename.expanduser()
                jump = replace(jump, identity_files=(key, *jump.identity_files))
            hops.append(jump)
        return hops

    def connection(self) -> paramiko.Transport:
        """The live, host-key-checked connection to the login node (made now if needed)."""
        return self._transport()

    def _transport(self) -> paramiko.Transport:
        """The live connection to the login node: made on first use, and again if it dropped."""
        with self._lock:
            if self._clients:
                live = self._clients[-1].get_transport()
                if live is not None and live.is_active():
                    return live
                self._close_clients()
            _quiet_paramiko()
            chain = [*self._hops(), self.target]
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
        known = _read_known_hosts(target)
        client = paramiko.SSHClient()
        host_keys = client.get_host_keys()
        for item in known:
            for name in item.entry.hostnames:
                host_keys.add(name, item.entry.key.get_name(), item.entry.key)
        policy = _AcceptNewHosts(target) if self.accept_new else _RefuseUnknownHosts()
        client.set_missing_host_key_policy(policy)
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
            raise _connect_error(exc, target, known, timeout) from exc
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
            raise SSHError(
                f"jump host {via} could not reach {to.hostname}:{to.port}: {exc}",
                host=to.hostname,
                port=to.port,
                hint="check ProxyJump and HostName in your ssh config "
                f"(`ssh -J {via.alias} {to.alias}` should work)",
            ) from exc

    def _close_clients(self) -> None:
        for client in reversed(self._clients):
            client.close()
        self._clients.clear()

    def close(self) -> None:
        """Close the connection (and any jump hosts); the next ``run`` connects again."""
        with self._lock:
            self._close_clients()

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
        transport = self._transport()
        target = self.target
        deadline = time.monotonic() + timeout_s
        try:
            channel = transport.open_session(timeout=max(timeout_s, 1.0))
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(
                f"cannot run {argv[0]} on {target}: {exc}",
                host=target.hostname,
                port=target.port,
                argv=argv,
                hint="the login node may limit sessions per connection (sshd MaxSessions)",
            ) from exc
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


def _live(client: paramiko.SSHClient, target: SSHTarget) -> paramiko.Transport:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise SSHError(f"the connection to {target} closed", host=target.hostname, port=target.port)
    return transport


class ConnectionLost(CommandTimeout):
    """The SSH connection dropped while a command ran: like a timeout, its outcome is unknown."""

    def __init__(self, argv: list[str], timeout_s: float, where: str) -> None:
        super().__init__(argv, timeout_s)
        self.args = (f"the connection to {where} dropped while {argv[0]} ran; outcome unknown",)


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


def _connect_error(
    exc: paramiko.SSHException | OSError | EOFError,
    target: SSHTarget,
    known: list[_KnownHost],
    timeout_s: float,
) -> SSHError:
    """paramiko's (and the socket's) exception, as the SSHError a user can act on."""
    host, port, name = target.hostname, target.port, target.known_hosts_name
    p = "" if port == SSH_PORT else f"-p {port} "
    if isinstance(exc, _UnknownHost):
        fingerprint, kind = exc.key.fingerprint, _key_type(exc.key)
        return UnknownHostKeyError(
            f"{target} is not a known host: its {exc.key.get_name()} key {fingerprint} is "
            f"not in {target.known_hosts}; not connecting",
            host=host,
            port=port,
            fingerprint=fingerprint,
            known_hosts=target.known_hosts,
            hint=f"compare {fingerprint} with the fingerprint your cluster's admins publish "
            f"(`ssh-keyscan {p}-t {kind} {host} | ssh-keygen -lf -` shows it); if it "
            f"matches, add it with `ssh-keyscan {p}-t {kind} {host} >> {target.known_hosts}`, "
            f"or connect once with `ssh {p}{target.user}@{host}` and accept it there",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        got, expected = exc.key, exc.expected_key
        line = next(
            (k.line for k in known if k.entry.key == expected and _names(k.entry, name)), None
        )
        where = f"{target.known_hosts}:{line}" if line else str(target.known_hosts)
        return ChangedHostKeyError(
            f"the host key of {target} has CHANGED: it offered {got.get_name()} "
            f"{got.fingerprint}, but {where} holds {expected.get_name()} "
            f"{expected.fingerprint}; not connecting (someone may be intercepting the "
            "connection, or the host was reinstalled)",
            host=host,
            port=port,
            fingerprint=got.fingerprint,
            known_hosts=target.known_hosts,
            line=line,
            hint="ask your cluster's admins whether the host key changed; only if it did, "
            f"remove the old key with `ssh-keygen -R '{name}' -f {target.known_hosts}` and "
            "accept the new one after checking its fingerprint",
        )
    if isinstance(exc, PromptNeeded):
        return SSHAuthError(
            f"SSH login as {target.user} on {target} needs keyboard-interactive answers "
            f"({exc}; typically a one-time 2FA code) and there is no terminal to ask on",
            host=host,
            port=port,
            user=target.user,
            hint="run the command in a terminal, in the foreground, and type the answer "
            "when asked; a tunnel that must come back on its own needs a login the server "
            "takes without questions (a key alone)",
        )
    if isinstance(exc, PromptRejected):
        return SSHAuthError(
            f"SSH login as {target.user} on {target} failed: the server rejected the "
            f"answer to {', '.join(repr(p) for p in exc.prompts) or 'its prompt'}; "
            "not trying again (a retry could burn another code or lock the account)",
            host=host,
            port=port,
            user=target.user,
            hint="run the command again and type a fresh code; "
            f"`ssh -v {p}{target.user}@{host} true` shows what the server asks",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        agent = bool(os.environ.get("SSH_AUTH_SOCK"))
        tried = [str(p) for p in target.identity_files]
        if not target.identities_only:
            tried += ["~/.ssh/id_*", *(["the agent's keys"] if agent else [])]
        why = (
            "the key is encrypted and no passphrase is available"
            if isinstance(exc, paramiko.PasswordRequiredException)
            else f"no key was accepted (tried {', '.join(tried)})"
        )
        if not target.identities_only and not agent:
            why += "; no ssh-agent is running (SSH_AUTH_SOCK is not set)"
        return SSHAuthError(
            f"SSH login as {target.user} on {target} failed: {why}",
            host=host,
            port=port,
            user=target.user,
            hint="load your key into the agent (`ssh-add ~/.ssh/id_ed25519`) or name it with "
            "`mt --identity PATH` (slurm.ssh_identity in site.yaml); "
            f"`ssh -v {p}{target.user}@{host} true` shows which keys the server accepts",
        )
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return SSHError(
            f"cannot connect to {host}:{port}: connection refused",
            host=host,
            port=port,
            hint="is that the login node's SSH port? (Port in your ssh config, "
            "slurm.ssh_port in site.yaml)",
        )
    if isinstance(exc, socket.gaierror):
        return SSHError(
            f"cannot connect to {host}:{port}: unknown host name ({exc.strerror})",
            host=host,
            port=port,
            hint="check the host name, or the HostName of that alias in your ssh config",
        )
    if isinstance(exc, TimeoutError):
        return SSHError(
            f"cannot connect to {host}:{port}: no answer within {timeout_s:g}s",
            host=host,
            port=port,
            hint="are you on the cluster's network (VPN)? does it need a ProxyJump host?",
        )
    return SSHError(
        f"SSH connection to {target} failed: {exc or type(exc).__name__}",
        host=host,
        port=port,
        hint=f"`ssh -v {p}{target.user}@{host} true` shows where it fails",
    )


def _quiet_paramiko() -> None:
    """paramiko logs connection failures itself; ours are raised as SSHError instead."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())


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
