"""The Redis URL of the limits shared by gateway replicas: where it is read, how it is shown.

The URL may carry a password, so it never goes on a command line (every user of the
machine can read those in ``ps``): `mt gateway` reads it from a private file or from the
environment, and logs and errors show it through ``where``, without user and password.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from hpc.errors import MTError

# Where `mt gateway` finds the URL without --redis-url-file.
REDIS_URL_ENV = "MT_REDIS_URL"
_DB = re.compile(r"^/?\d*$")  # a redis:// URL's path: the database number
_URL_HINT = "write the URL (redis://[:PASSWORD@]HOST:PORT/DB) into it, mode 0600"


def read_url(path: Path) -> str:
    """The Redis URL in the file ``path`` (its first line)."""
    try:
        url = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise MTError(
            f"cannot read the Redis URL file {path}: {exc.strerror or exc}", hint=_URL_HINT
        ) from exc
    if not url:
        raise MTError(f"the Redis URL file {path} is empty", hint=_URL_HINT)
    return url.splitlines()[0]


def where(url: str) -> str:
    """``url`` without its user and password: what logs and errors may show (a URL that
    does not parse shows only its scheme: a password may be what breaks it)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return f"{parts.scheme}://…"
    path = parts.path if parts.scheme == "unix" or _DB.match(parts.path) else "/…"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{path}"
