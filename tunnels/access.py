"""What a laptop needs to use the gateway through a tunnel: its URL and the owner's key.

The key is read on the login node over the tunnel's own SSH connection, with ``cat`` of the
key file's path (tunnels.base.TunnelEngine.run_remote): the key travels in the command's
output, never in an argv on either side. It is handed to the caller as
``OPENAI_BASE_URL=…``/``OPENAI_API_KEY=…`` lines, the form the ``openai`` client, a shell
(``set -a; . FILE``), ``docker --env-file`` and python-dotenv all read, or written to a
0600 env file. A login node without an owner key (the gateway never ran there, or it is
someone else's with ``--keys``) is not a failure: the tunnel works, and the reason comes
back as an OwnerKeyError for the CLI to show as a warning.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from hpc.errors import MTError
from hpc.ownerkey import REMOTE_OWNER_KEY, parse_key
from hpc.privatefile import write_private
from tunnels.base import TunnelEngine, TunnelSpec
from tunnels.errors import OwnerKeyError, TunnelError

BASE_URL_VAR = "OPENAI_BASE_URL"
API_KEY_VAR = "OPENAI_API_KEY"
_READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Access:
    """The gateway's OpenAI root through the tunnel and, if it could be read, the key."""

    base_url: str
    key: str | None = field(default=None, repr=False)

    def env_lines(self, *, with_key: bool = True) -> list[str]:
        """``NAME=value`` lines: the key first, the base URL last (a reader that waits for
        ``OPENAI_BASE_URL=`` has every line then)."""
        lines = [f"{API_KEY_VAR}={self.key}"] if with_key and self.key is not None else []
        return [*lines, f"{BASE_URL_VAR}={self.base_url}"]

    def env(self, *, with_key: bool = True) -> dict[str, str]:
        """The same as a mapping (for ``--json``)."""
        return dict(line.split("=", 1) for line in self.env_lines(with_key=with_key))


def remote_path_word(path: str) -> str:
    """``path`` on the login node as one shell word: quoted, with a leading ``~/`` kept as
    the remote ``$HOME``."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def key_command(owner_key: str | None) -> str:
    """The command that prints the owner key on the login node (a path in it, no secret)."""
    return "cat -- " + (REMOTE_OWNER_KEY if owner_key is None else remote_path_word(owner_key))


def read_access(engine: TunnelEngine, spec: TunnelSpec) -> tuple[Access, MTError | None]:
    """The access through ``engine`` (up), and why the key is missing, if it is."""
    access = Access(base_url=f"{spec.url}/v1")
    shown = spec.owner_key or "$MT_HOME/gateway/owner.key"
    where = f"{shown} on {spec.host}"
    try:
        output = engine.run_remote(key_command(spec.owner_key), timeout_s=_READ_TIMEOUT_S)
    except TunnelError as exc:
        return access, exc
    said = output.stderr.strip().splitlines()
    if output.code != 0:
        missing = any("No such file" in line for line in said)
        return access, OwnerKeyError(
            f"no owner key at {where}"
            if missing
            else f"cannot read {where}: {said[-1] if said else f'cat exited with {output.code}'}",
            local_port=spec.local_port,
            hint="start `mt gateway` there once (it creates the key), or pass `--owner-key "
            "PATH` if its MT_HOME is elsewhere; a gateway run with `--keys` by someone else "
            f"takes the key they give you: set {API_KEY_VAR} to it",
        )
    # The last line: a login shell may print a banner first. What else it says is never shown.
    lines = output.stdout.decode("utf-8", "replace").strip().splitlines()
    key = parse_key(lines[-1]) if lines else None
    if key is None:
        return access, OwnerKeyError(
            f"{where} does not hold a gateway key (mt-…)",
            local_port=spec.local_port,
            hint="on the login node, `mt keys owner --rotate` writes a new one",
        )
    return Access(base_url=access.base_url, key=key), None


def write_env_file(path: Path, access: Access) -> None:
    """The env lines in ``path``, 0600 (its directory made 0700 if missing), replaced whole."""
    try:
        write_private(path, "".join(line + "\n" for line in access.env_lines()).encode())
    except OSError as exc:
        raise MTError(
            f"cannot write {path}: {exc.strerror}",
            hint="pass --env-file a path in a directory you own",
        ) from exc


def read_env_file(path: Path) -> Access:
    """The access an env file (as :func:`write_env_file` writes it) holds."""
    values = dict(
        line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines() if "=" in line
    )
    return Access(base_url=values[BASE_URL_VAR], key=values.get(API_KEY_VAR))
