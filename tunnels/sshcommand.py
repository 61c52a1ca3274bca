"""The command lines and the private ssh_config of the OpenSSH engine (pure, but control_dir).

Kept apart from tunnels.openssh, which runs and supervises them: these are what the unit
tests check word by word (every hop reads the config; loopback only; a control socket in a
private directory).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hpc.errors import MTError
from tunnels.base import TunnelSpec


def control_dir() -> Path:
    """A private (0700, ours) directory for ControlPath sockets, short enough for AF_UNIX."""
    path = Path(tempfile.gettempdir()) / f"mt-ssh-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise MTError(
            f"{path} is not a private directory of this user (0700)",
            hint=f"remove it (`rm -r {path}`); mt creates it again, private",
        )
    return path


def destination(host: str) -> str:
    """``host`` as ssh's destination argument: ``user@host:port`` becomes an ssh:// URI."""
    if ":" in host.rsplit("@", 1)[-1] and not host.startswith("ssh://"):
        return f"ssh://{host}"
    return host


_SYSTEM_CONFIG = Path("/etc/ssh/ssh_config")


def _config_word(path: Path, flag: str) -> str:
    """``path`` as one ssh_config argument: absolute, double-quoted, ``%`` escaped."""
    text = str(path.expanduser().absolute())
    if any(c in text for c in '"\r\n'):
        raise MTError(
            f"{flag} {text!r}: ssh_config cannot hold a path with a double quote or a newline",
            hint=f"move the file to a path without them and pass that to {flag}",
        )
    return '"' + text.replace("%", "%%") + '"'


def ssh_config_text(spec: TunnelSpec, *, batch: bool, includes: Sequence[Path]) -> str:
    """The private ssh_config (``-F``) that every hop reads, jump hosts included (pure).

    ssh hands ``-F`` on to the ssh it starts for ProxyJump, but not ``-o`` or ``-i``: options
    given only on the command line would check the login node's key strictly and let the
    jump host fall back to the user's defaults. In a ``Host *`` block ahead of the user's
    own config (Included after it), these values win for every host, since ssh takes the
    first value it reads.
    """
    options = {
        "BatchMode": "yes" if batch else "no",
        "ConnectTimeout": f"{int(spec.connect_timeout_s)}",
        # One answer per prompt: a wrong 2FA code ends the login instead of asking again.
        "NumberOfPasswordPrompts": "1",
        "ServerAliveCountMax": str(spec.keepalive_count),
        "ServerAliveInterval": str(spec.keepalive_s),
        "StrictHostKeyChecking": "accept-new" if spec.accept_new else "yes",
    }
    if spec.identity is not None:
        options["IdentitiesOnly"] = "yes"
        options["IdentityFile"] = _config_word(spec.identity, "--identity")
    if spec.known_hosts is not None:
        options["UserKnownHostsFile"] = _config_word(spec.known_hosts, "--known-hosts")
    lines = ["# Written by `mt tunnel` for this tunnel only; rewritten on every start.", "Host *"]
    lines += [f"    {key} {value}" for key, value in sorted(options.items())]
    lines += [f"Include {_config_word(path, '--ssh-config')}" for path in includes]
    return "\n".join(lines) + "\n"


def config_includes(spec: TunnelSpec) -> list[Path]:
    """The configs ssh would read without ``-F``: the user's (or ``--ssh-config``), the system's."""
    user = spec.ssh_config or Path("~/.ssh/config").expanduser()
    return [p for p in (user, _SYSTEM_CONFIG) if p.is_file()]


def ssh_argv(spec: TunnelSpec, *, config: Path, control_path: Path) -> list[str]:
    """The master ``ssh`` command line for ``spec``, reading the generated ``config`` (pure)."""
    options = {"ControlMaster": "yes", "ControlPath": str(control_path), "ControlPersist": "no"}
    argv = ["ssh", "-F", str(config), "-N"]
    if spec.jump:
        argv += ["-J", spec.jump]
    for key, value in sorted(options.items()):
        argv += ["-o", f"{key}={value}"]
    return [*argv, "--", destination(spec.host)]


def forward_argv(spec: TunnelSpec, *, config: Path, control_path: Path) -> list[str]:
    """``ssh -O forward``: the running master starts listening on 127.0.0.1 (pure)."""
    return [
        "ssh", "-F", str(config), "-S", str(control_path), "-O", "forward",
        "-L", f"127.0.0.1:{spec.local_port}:127.0.0.1:{spec.remote_port}",
        "--", destination(spec.host),
    ]  # fmt: skip


def remote_argv(spec: TunnelSpec, *, config: Path, control_path: Path, command: str) -> list[str]:
    """``ssh -S``: ``command`` on the login node through the running master (pure).

    It rides the master's authenticated connection (no second login or 2FA code); with
    ``ControlMaster=no`` it never becomes a master itself. ``command`` names paths only:
    it is in this argv and in the login node's `ps`.
    """
    return [
        "ssh", "-F", str(config), "-S", str(control_path), "-o", "ControlMaster=no", "-T",
        "--", destination(spec.host), command,
    ]  # fmt: skip
