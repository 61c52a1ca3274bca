"""Client API keys: ``keys.yaml`` holds only their SHA-256, never a key itself.

    keys:
      - name: alice
        sha256: 3f0a…  # hex of sha256(key)

A key is ``mt-`` + 32 random bytes (url-safe base64), so one unsalted SHA-256 is enough:
nobody can guess such a key from its hash, and the gateway can check a key with one hash
and constant-time comparisons, without a slow KDF on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hpc.configfile import Loc, load_model
from hpc.errors import MTError
from hpc.privatefile import write_private

KEY_PREFIX = "mt-"


class KeyEntry(BaseModel):
    """One client: a name for logs and the hash of its key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex of sha256(key)")


class KeysFile(BaseModel):
    """The whole ``keys.yaml``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeyEntry, ...] = ()


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as stored in ``keys.yaml``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The known key hashes; answers who a bearer token belongs to."""

    def __init__(self, entries: tuple[KeyEntry, ...]) -> None:
        self._entries = tuple((entry.name, entry.sha256.encode("ascii")) for entry in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, bearer: str) -> str | None:
        """The name of the client whose key is ``bearer``, or None.

        Every entry is compared, with ``hmac.compare_digest``, so the time taken does not
        tell which entry (or how much of one) matched.
        """
        digest = hash_key(bearer).encode("ascii")
        found: str | None = None
        for name, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        return found


def _unique_names(keys: KeysFile, _line_of: Callable[[Loc], int | None]) -> list[tuple[Loc, str]]:
    seen: dict[str, int] = {}
    problems: list[tuple[Loc, str]] = []
    for index, entry in enumerate(keys.keys):
        if entry.name in seen:
            problems.append(
                (
                    ("keys", index, "name"),
                    f"duplicate name {entry.name!r} (first in keys[{seen[entry.name]}])",
                )
            )
        else:
            seen[entry.name] = index
    return problems


def read_keys_file(path: Path) -> KeysFile:
    """Parse ``keys.yaml``; a bad field raises ConfigError naming file:line: field."""
    return load_model(path, KeysFile, _unique_names)


def load_keys(path: Path) -> KeyStore:
    """The key store from ``keys.yaml`` (ConfigError if the file is missing or bad)."""
    return KeyStore(read_keys_file(path).keys)


def create_key(path: Path, name: str) -> str:
    """Add a client called ``name`` to ``keys.yaml`` and return its new key (shown once).

    The file is created if needed (its directory 0700 when this creates it) and always
    rewritten whole, 0600, through tmp + fsync + rename, so a reader never sees half of it.
    Comments in an existing file are not kept.
    """
    try:
        entry = KeyEntry(name=name, sha256="0" * 64)  # checks the name before any I/O
    except ValidationError as exc:
        raise MTError(
            f"bad key name {name!r}",
            hint="use 1-64 letters, digits and . _ @ + - (starting with a letter or digit)",
        ) from exc
    current = read_keys_file(path) if path.exists() else KeysFile()
    if any(existing.name == name for existing in current.keys):
        raise MTError(
            f"{path} already has a key named {name!r}",
            hint="pick another name, or remove that entry from the file to replace its key",
        )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = entry.model_copy(update={"sha256": hash_key(key)})
    updated = KeysFile(keys=(*current.keys, entry))
    _write_atomic(path, _render(updated))
    return key


def _render(keys: KeysFile) -> bytes:
    body = yaml.safe_dump(keys.model_dump(mode="json"), sort_keys=False)
    header = "# ModelTainer gateway keys: only hashes (sha256 of each key), never a key.\n"
    return (header + body).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_private(path, data)
    except OSError as exc:
        raise MTError(
            f"cannot write {path}: {exc.strerror}",
            hint="pass --keys with a path in a directory you own",
        ) from exc
