"""Rendering for the CLI: errors on stderr, JSON on stdout, human tables via rich."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console

from hpc.errors import MTError


def stdout() -> Console:
    """A console for results."""
    return Console(highlight=False)


def stderr() -> Console:
    """A console for progress and errors."""
    return Console(stderr=True, highlight=False)


def print_json(data: object) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_error(exc: MTError) -> None:
    """``error: …`` (one line per line of the message) and ``hint: …`` on stderr."""
    for line in exc.message.splitlines() or [""]:
        sys.stderr.write(f"error: {line}\n")
    if exc.hint:
        sys.stderr.write(f"hint: {exc.hint}\n")
    sys.stderr.flush()


def age(since: float, now: float | None = None) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    seconds = max(0, int((now or time.time()) - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
