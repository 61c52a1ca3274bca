"""Draining an engine: the requests it has in flight finish, within a budget, before it stops.

The job wrapper marks its record ``draining`` first; the gateway re-reads the registry every
``reload_interval_s`` (1 s by default) and from then on routes only to ``ready`` records.
A request the gateway sent just before it saw ``draining`` may still be on its way, so the
engine is never called idle before ``SETTLE_S`` have passed since the drain began.

How the wrapper knows what is in flight: every request reaches the engine through the
job's front (hpc.job.front), which counts the requests it is forwarding (the gateway's
health probes aside), whatever the engine; the swap pool counts its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

# The gateway's default reload_interval_s is 1 s: twice that for it to see `draining`.
SETTLE_S = 2.0
POLL_S = 0.25

Why = Literal["idle", "budget", "exited"]


class _Process(Protocol):
    def poll(self) -> int | None: ...


class Counter(Protocol):
    """What :func:`drain` asks: requests in flight now (None: unknown), and how it counts."""

    @property
    def method(self) -> str: ...

    def count(self) -> int | None: ...


@dataclass(frozen=True)
class Drained:
    """How a drain ended: ``idle`` (nothing in flight), ``budget`` spent, engine ``exited``."""

    why: Why
    waited_s: float
    in_flight: int | None  # the last count (None: the engine could not say)
    method: str  # how it was counted: an endpoint path, or "tcp"

    def log_line(self) -> str:
        """The job log's line for this drain."""
        after = f"after {self.waited_s:.1f}s"
        if self.why == "idle":
            return f"drained {after}: nothing in flight ({self.method})"
        if self.why == "exited":
            return f"engine exited while draining ({after})"
        left = "unknown" if self.in_flight is None else str(self.in_flight)
        return f"drain budget spent {after}: {left} request(s) in flight ({self.method}); stopping"


def drain(
    proc: _Process,
    in_flight: Counter,
    deadline: Callable[[], float],
    *,
    settle_s: float = SETTLE_S,
    poll_s: float = POLL_S,
) -> Drained:
    """Wait until ``in_flight`` says nothing is left (after ``settle_s``), the monotonic
    ``deadline()`` passes (a later signal may move it closer), or the engine exits."""
    started = time.monotonic()
    last: int | None = None
    while True:
        now = time.monotonic()
        if proc.poll() is not None:
            return Drained("exited", now - started, last, in_flight.method)
        if now >= deadline():
            return Drained("budget", now - started, last, in_flight.method)
        last = in_flight.count()
        if last == 0 and now - started >= settle_s:
            return Drained("idle", time.monotonic() - started, last, in_flight.method)
        time.sleep(max(0.0, min(poll_s, deadline() - time.monotonic())))
