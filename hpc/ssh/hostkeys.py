"""Host keys: one known_hosts file, unknown keys refused (or, opted in, accepted once).

Host keys are checked against one known_hosts file and nothing else: an unknown key is
refused, showing its SHA256 fingerprint, and never added (``StrictHostKeyChecking`` in the
config is ignored) unless the caller opts in with ``accept_new`` (OpenSSH's
``accept-new``: the key is appended to that file, and from then on pinned); a changed key
is a hard failure naming the known_hosts line, with or without ``accept_new``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import NoReturn

import paramiko
from paramiko.hostkeys import HostKeyEntry, HostKeys, InvalidHostKey

from hpc.errors import SSHError
from hpc.ssh.target import SSHTarget


@dataclass(frozen=True)
class KnownHost:
    """One usable known_hosts line and its line number (for the changed-key message)."""

    line: int
    entry: HostKeyEntry


def read_known_hosts(target: SSHTarget) -> list[KnownHost]:
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
    out: list[KnownHost] = []
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
            out.append(KnownHost(number, entry))
    return out


def names_host(entry: HostKeyEntry, name: str) -> bool:
    """Whether the known_hosts ``entry`` is for ``name`` (plain or hashed)."""
    for listed in entry.hostnames:
        if listed.startswith("|1|"):  # a hashed name (HashKnownHosts yes)
            if hmac.compare_digest(HostKeys.hash_host(name, listed), listed):
                return True
        elif listed == name:
            return True
    return False


class UnknownHost(paramiko.SSHException):
    """Raised by the refusing policy; carries the refused key for the error message."""

    def __init__(self, name: str, key: paramiko.PKey) -> None:
        super().__init__(f"{name} not found in known_hosts")
        self.key = key


class _RefuseUnknownHosts(paramiko.RejectPolicy):
    """paramiko's RejectPolicy, keeping the refused key so the error can show its fingerprint."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise UnknownHost(hostname, key)


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


def trust(
    client: paramiko.SSHClient, target: SSHTarget, known: list[KnownHost], *, accept_new: bool
) -> None:
    """Make ``client`` trust exactly the ``known`` keys, and refuse (or accept-new) the rest."""
    host_keys = client.get_host_keys()
    for item in known:
        for name in item.entry.hostnames:
            host_keys.add(name, item.entry.key.get_name(), item.entry.key)
    policy = _AcceptNewHosts(target) if accept_new else _RefuseUnknownHosts()
    client.set_missing_host_key_policy(policy)


def key_type(key: paramiko.PKey) -> str:
    """The key's type as ``ssh-keyscan -t`` takes it: ``ed25519``, ``rsa``, ``ecdsa``."""
    name = key.get_name()
    return name.removeprefix("ssh-") if name.startswith("ssh-") else name.split("-")[0]
