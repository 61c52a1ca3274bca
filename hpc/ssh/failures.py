"""paramiko's and the socket's failures, as the hpc.errors a user can act on.

The one boundary where foreign SSH exceptions become ours: hpc.ssh.connection and
hpc.ssh.exec catch paramiko/socket errors and raise what these functions build, ``from``
the original. Each message names the host; each hint says what to run or change.
"""

from __future__ import annotations

import logging
import os
import socket

import paramiko

from hpc.errors import (
    ChangedHostKeyError,
    SSHAuthError,
    SSHError,
    UnknownHostKeyError,
)
from hpc.ssh.auth import PromptNeeded, PromptRejected
from hpc.ssh.hostkeys import KnownHost, UnknownHost, key_type, names_host
from hpc.ssh.target import SSH_PORT, SSHTarget
from hpc.transport import CommandTimeout

SSHFailure = paramiko.SSHException | OSError | EOFError  # what paramiko and sockets raise


class ConnectionLost(CommandTimeout):
    """The SSH connection dropped while a command ran: like a timeout, its outcome is unknown."""

    def __init__(self, argv: list[str], timeout_s: float, where: str) -> None:
        super().__init__(argv, timeout_s)
        self.args = (f"the connection to {where} dropped while {argv[0]} ran; outcome unknown",)


def closed_error(target: SSHTarget) -> SSHError:
    """The connection to ``target`` is gone before we could use it."""
    return SSHError(f"the connection to {target} closed", host=target.hostname, port=target.port)


def jump_error(exc: SSHFailure, via: SSHTarget, to: SSHTarget) -> SSHError:
    """The jump host ``via`` could not open a channel on to ``to``."""
    return SSHError(
        f"jump host {via} could not reach {to.hostname}:{to.port}: {exc}",
        host=to.hostname,
        port=to.port,
        hint="check ProxyJump and HostName in your ssh config "
        f"(`ssh -J {via.alias} {to.alias}` should work)",
    )


def exec_error(exc: SSHFailure, argv: list[str], target: SSHTarget) -> SSHError:
    """The login node would not start ``argv`` on the connection."""
    return SSHError(
        f"cannot run {argv[0]} on {target}: {exc}",
        host=target.hostname,
        port=target.port,
        argv=argv,
        hint="the login node may limit sessions per connection (sshd MaxSessions)",
    )


def connect_error(
    exc: SSHFailure,
    target: SSHTarget,
    known: list[KnownHost],
    timeout_s: float,
) -> SSHError:
    """paramiko's (and the socket's) exception, as the SSHError a user can act on."""
    host, port, name = target.hostname, target.port, target.known_hosts_name
    p = "" if port == SSH_PORT else f"-p {port} "
    if isinstance(exc, UnknownHost):
        fingerprint, kind = exc.key.fingerprint, key_type(exc.key)
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
            (k.line for k in known if k.entry.key == expected and names_host(k.entry, name)), None
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


def quiet_paramiko() -> None:
    """paramiko logs connection failures itself; ours are raised as SSHError instead."""
    logger = logging.getLogger("paramiko")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
