"""The gateway owner's key: ``$MT_HOME/gateway/owner.key``, how it is made and read.

`mt gateway` without ``--keys`` still requires a key: on its first start it creates this
file (0600 in the 0700 ``$MT_HOME/gateway``, only if absent), and it always accepts the key
in it as the client ``owner``. Loopback is shared by every user of a login node, so a file
only its owner can read is what tells the owner's requests from theirs. `mt keys owner`
prints it on the owner's terminal; `mt tunnel` reads it over its SSH connection (by path,
never putting the key in an argv).

The format is that of `mt keys create`'s keys (``mt-`` + 32 random bytes, url-safe
base64), so a client cannot tell the two apart. Core, not gateway: the CLI, the gateway and
the tunnels all need where it lives and what a valid one looks like.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from hpc.errors import MTError
from hpc.privatefile import write_private

KEY_PREFIX = "mt-"
OWNER_NAME = "owner"  # the client name the gateway logs and limits the owner's requests under
# Where the owner key lives on a login node, as a POSIX shell word: the remote shell expands
# it, so a login node whose shell sets MT_HOME is honoured (mt_home's default otherwise).
REMOTE_OWNER_KEY = '"${MT_HOME:-$HOME/.mt}"/gateway/owner.key'
# `mt keys create`'s keys: the prefix, then url-safe base64 (no padding) of 32 bytes.
_KEY = re.compile(r"^mt-[A-Za-z0-9_-]{20,200}$")


def new_key() -> str:
    """A fresh client key: ``mt-`` + 32 random bytes, url-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def owner_key_path(home: Path) -> Path:
    """``$MT_HOME/gateway/owner.key``."""
    return home / "gateway" / "owner.key"


def parse_key(text: str) -> str | None:
    """The key a file holds (one line, surrounding whitespace ignored), or None if it holds
    something else. Never echoes what it read: it may be a secret of another shape."""
    key = text.strip()
    return key if _KEY.match(key) else None


def read_owner_key(path: Path) -> str:
    """The key in ``path``; MTError (naming the file, never its content) if it is unusable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise MTError(
            f"no owner key at {path}",
            hint="`mt gateway` creates it on its first start, `mt keys owner` too",
        ) from exc
    except OSError as exc:
        raise MTError(
            f"cannot read the owner key {path}: {exc.strerror}",
            hint="it must be a file of yours (0600); remove it and `mt keys owner` makes a new one",
        ) from exc
    key = parse_key(text)
    if key is None:
        raise MTError(
            f"{path} does not hold a gateway key (mt-…)",
            hint=f"remove it (`rm {path}`); `mt gateway` or `mt keys owner` writes a new one",
        )
    return key


def ensure_owner_key(home: Path) -> tuple[Path, bool]:
    """The owner key's path, creating the key if there is none; and whether it was created.

    Create-if-absent is one ``link``, so two `mt` commands starting at once end up with the
    same key. An existing file is never replaced (a running gateway and clients use it).
    """
    path = owner_key_path(home)
    if path.exists():
        return path, False
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # write_private makes gateway/ 0700
        created = write_private(path, (new_key() + "\n").encode("ascii"), replace=False)
    except OSError as exc:
        raise MTError(
            f"cannot write the owner key {path}: {exc.strerror}",
            hint="MT_HOME must be a directory of yours; set MT_HOME to one",
        ) from exc
    return path, created


def rotate_owner_key(home: Path) -> Path:
    """Replace the owner key with a new one; a running gateway accepts only the new one
    after its next reload (about 1 s)."""
    path = owner_key_path(home)
    try:
        write_private(path, (new_key() + "\n").encode("ascii"))
    except OSError as exc:
        raise MTError(
            f"cannot write the owner key {path}: {exc.strerror}",
            hint="MT_HOME must be a directory of yours; set MT_HOME to one",
        ) from exc
    return path
