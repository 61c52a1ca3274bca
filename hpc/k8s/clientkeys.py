"""The gateway's client keys (keys.yaml, hashes only) as ``mt render``/``mt submit`` read
them for the gateway's Secret."""

from __future__ import annotations

import shlex
from pathlib import Path

from hpc.errors import MTError
from hpc.permissions import enforce


def read_client_keys(path: Path) -> str:
    """The text of ``path`` (private: refused if others can read it); MTError if absent."""
    enforce([path])
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MTError(
            f"no client keys for the gateway: {path} does not exist",
            hint=f"mt keys create NAME --keys {shlex.quote(str(path))} makes one (the key is "
            "shown once; keys.yaml keeps only its hash), then render again",
        ) from None
    except OSError as exc:
        raise MTError(f"cannot read {path}: {exc.strerror}", hint="check the path") from exc
