"""Where an SSH login goes: ``~/.ssh/config`` (paramiko.SSHConfig) resolved into SSHTargets.

An alias works as it does for ssh: HostName, User, Port, IdentityFile, IdentitiesOnly,
UserKnownHostsFile and ProxyJump (each jump is a hop of its own, resolved the same way; the
jump hosts' own ProxyJump lines are not followed). Arguments given by the caller win over
the config, and ``user@``/``:port`` written in the host win over both.
"""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass, replace
from pathlib import Path

import paramiko

from hpc.errors import SSHError

SSH_PORT = 22
_HOP = re.compile(r"^(?:(?P<user>[^@]+)@)?(?P<host>\[[^\]]+\]|[^:]+)(?::(?P<port>\d+))?$")


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


def load_ssh_config(path: Path | None, host: str) -> paramiko.SSHConfig:
    """The ssh config at ``path`` (default ``~/.ssh/config``; a missing default is empty)."""
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


def resolve_target(
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


def jump_hops(
    target: SSHTarget,
    config: paramiko.SSHConfig,
    *,
    proxy_jump: str | None,
    key: Path | None,
    known: Path | None,
) -> list[SSHTarget]:
    """The jump hosts before ``target``, in order: ``proxy_jump`` (`-J`) or the config's."""
    hops: list[SSHTarget] = []
    jumps = tuple(proxy_jump.split(",")) if proxy_jump else target.proxy_jump
    for spec in jumps:
        hop = spec.strip()
        if not hop or any(c.isspace() for c in hop):
            raise SSHError(
                f"ssh config: cannot read ProxyJump {spec!r} for {target.alias}",
                host=target.hostname,
                port=target.port,
                hint="write it as [user@]host[:port], comma-separated for several jumps",
            )
        jump = resolve_target(hop, config, user=None, port=None, key=None, known=known)
        if key is not None:
            # `--identity` is tried on the jump hosts too, first, as OpenSSH's `-i` is.
            jump = replace(jump, identity_files=(key.expanduser(), *jump.identity_files))
        hops.append(jump)
    return hops
