"""Client API keys: ``keys.yaml`` holds only their SHA-256, never a key itself.

    keys:
      - name: alice
        sha256: 3f0a…            # hex of sha256(key)
        models: ["gemma-*"]      # fnmatch globs; omitted: every model
        requests_per_min: 60     # omitted: no limit
        tokens_per_min: 100000   # prompt + completion tokens; omitted: no limit
        max_on_demand_jobs: 1    # on-demand jobs its requests may have started; omitted: no limit
        expires_at: 2027-01-01T00:00:00Z   # omitted: never

A key is ``mt-`` + 32 random bytes (url-safe base64), so one unsalted SHA-256 is enough:
nobody can guess such a key from its hash, and the gateway can check a key with one hash
and constant-time comparisons, without a slow KDF on every request.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hpc.configfile import Loc, load_model
from hpc.errors import MTError
from hpc.ownerkey import OWNER_NAME, new_key, read_owner_key
from hpc.privatefile import write_private


class KeyEntry(BaseModel):
    """One client: a name for logs, the hash of its key, what it may use and how much."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex of sha256(key)")
    models: tuple[str, ...] | None = Field(
        default=None, description="fnmatch globs of the model names allowed; None: all"
    )
    requests_per_min: int | None = Field(default=None, gt=0, description="None: no limit")
    tokens_per_min: int | None = Field(default=None, gt=0, description="None: no limit")
    expires_at: datetime | None = Field(default=None, description="None: never expires")
    max_on_demand_jobs: int | None = Field(
        default=None,
        gt=0,
        description="live on-demand jobs this key's requests started, at most; None: no limit",
    )

    def expired(self, now: datetime) -> bool:
        """True once ``expires_at`` has passed (a naive time counts as UTC)."""
        if self.expires_at is None:
            return False
        expires = self.expires_at
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=timezone.utc)
        return now >= expires


class Client:
    """A key as the gateway uses it on each request: its entry plus a compiled allow-list."""

    __slots__ = ("_allowed", "entry", "name")

    def __init__(self, entry: KeyEntry) -> None:
        self.entry = entry
        self.name = entry.name
        self._allowed: re.Pattern[str] | None = None
        if entry.models is not None:
            # One regex for all the globs: a single match call per request.
            pattern = "|".join(fnmatch.translate(glob) for glob in entry.models) or "(?!)"
            self._allowed = re.compile(pattern)

    def allows(self, model: str) -> bool:
        """True if ``model`` matches one of the key's globs (case-sensitive), or it has none."""
        return self._allowed is None or self._allowed.match(model) is not None


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
        self._entries = tuple((Client(entry), entry.sha256.encode("ascii")) for entry in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, bearer: str) -> Client | None:
        """The client whose key is ``bearer`` (expired or not), or None.

        Every entry is compared, with ``hmac.compare_digest``, so the time taken does not
        tell which entry (or how much of one) matched.
        """
        digest = hash_key(bearer).encode("ascii")
        found: Client | None = None
        for client, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = client
        return found

    def check(self, bearer: str) -> str | None:
        """The name of the client whose key is ``bearer``, or None."""
        client = self.find(bearer)
        return None if client is None else client.name


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


def owner_entry(path: Path) -> KeyEntry:
    """The owner key in ``path`` as the client ``owner``: every model, no limits, no expiry.

    MTError if the file is missing or does not hold a key (hpc.ownerkey)."""
    return KeyEntry(name=OWNER_NAME, sha256=hash_key(read_owner_key(path)))


def load_key_store(keys_file: Path | None, owner_key_file: Path | None) -> KeyStore | None:
    """The clients of a gateway: the owner (if ``owner_key_file``) and ``keys.yaml``'s (if
    ``keys_file``); None when neither is given (auth off: in-process tests and embedders).

    ConfigError for a bad keys.yaml, MTError for an unusable owner key.
    """
    if keys_file is None and owner_key_file is None:
        return None
    entries = read_keys_file(keys_file).keys if keys_file is not None else ()
    if owner_key_file is not None:
        entries = (owner_entry(owner_key_file), *entries)
    return KeyStore(entries)


def create_key(
    path: Path,
    name: str,
    *,
    models: tuple[str, ...] | None = None,
    requests_per_min: int | None = None,
    tokens_per_min: int | None = None,
    expires_at: datetime | None = None,
    max_on_demand_jobs: int | None = None,
) -> str:
    """Add a client called ``name`` to ``keys.yaml`` and return its new key (shown once).

    The file is created if needed (its directory 0700 when this creates it) and always
    rewritten whole, 0600, through tmp + fsync + rename, so a reader never sees half of it.
    Comments in an existing file are not kept.
    """
    try:
        # Checks the name and limits before any I/O.
        entry = KeyEntry(
            name=name,
            sha256="0" * 64,
            models=models,
            requests_per_min=requests_per_min,
            tokens_per_min=tokens_per_min,
            expires_at=expires_at,
            max_on_demand_jobs=max_on_demand_jobs,
        )
    except ValidationError as exc:
        if any(error["loc"] == ("name",) for error in exc.errors()):
            raise MTError(
                f"bad key name {name!r}",
                hint="use 1-64 letters, digits and . _ @ + - (starting with a letter or digit)",
            ) from exc
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise MTError(
            f"bad settings for key {name!r}: {problems}",
            hint="limits are positive integers; expiry is an ISO 8601 time",
        ) from exc
    if name == OWNER_NAME:
        raise MTError(
            f"the key name {OWNER_NAME!r} is the gateway owner's",
            hint="`mt keys owner` prints your own key; give others their own names",
        )
    current = read_keys_file(path) if path.exists() else KeysFile()
    if any(existing.name == name for existing in current.keys):
        raise MTError(
            f"{path} already has a key named {name!r}",
            hint="pick another name, or remove that entry from the file to replace its key",
        )
    key = new_key()
    entry = entry.model_copy(update={"sha256": hash_key(key)})
    updated = KeysFile(keys=(*current.keys, entry))
    _write_atomic(path, _render(updated))
    return key


def list_keys(path: Path) -> tuple[KeyEntry, ...]:
    """The entries of ``keys.yaml`` (ConfigError if it is missing or bad)."""
    return read_keys_file(path).keys


def revoke_key(path: Path, name: str) -> None:
    """Remove the key called ``name``; a running gateway drops it on its next reload."""
    current = read_keys_file(path)
    kept = tuple(entry for entry in current.keys if entry.name != name)
    if len(kept) == len(current.keys):
        known = ", ".join(entry.name for entry in current.keys) or "none"
        raise MTError(f"{path} has no key named {name!r}", hint=f"known names: {known}")
    _write_atomic(path, _render(KeysFile(keys=kept)))


def _render(keys: KeysFile) -> bytes:
    body = yaml.safe_dump(keys.model_dump(mode="json", exclude_none=True), sort_keys=False)
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
