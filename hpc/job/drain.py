"""Draining an engine: the requests it has in flight finish, within a budget, before it stops.

The job wrapper marks its record ``draining`` first; the gateway re-reads the registry every
``reload_interval_s`` (1 s by default) and from then on routes only to ``ready`` records.
A request the gateway sent just before it saw ``draining`` may still be on its way, so the
engine is never called idle before ``SETTLE_S`` have passed since the drain began.

How the wrapper knows what is in flight: it asks the engine (:class:`InFlight`), the way the
gateway's prober does (``hpc.job.engineload``): vLLM's ``/metrics``, llama-server's
``/metrics`` (with ``--metrics``) or ``/slots``. An engine with neither (llama-cpp-python's
server) is counted from outside: TCP connections established to its port. That count
includes idle keep-alive connections, which the engine's server closes after its keep-alive
timeout (5 s in uvicorn), so for such an engine an idle drain lasts up to that long; it never
ends while a request is still being answered, which is what matters.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from hpc.job.engineload import (
    ABSENT_STATUSES,
    EngineLoad,
    established_connections,
    load_paths,
    parse_engine_load,
    parse_slots,
)

# The gateway's default reload_interval_s is 1 s: twice that for it to see `draining`.
SETTLE_S = 2.0
POLL_S = 0.25
_MAX_BODY_BYTES = 4 * 1024 * 1024

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


class InFlight:
    """Counts an engine's requests in flight by the best means it offers (see the module doc).

    The first endpoint that answers with a load is kept; one that answers 404/405/501 or
    without the series is dropped; when none is left, established TCP connections to
    ``port`` are counted. The wrapper's own GETs are closed before that count is taken.
    """

    def __init__(self, root: str, key: str | None, engine: str, port: int) -> None:
        self.root = root.rstrip("/")
        self.key = key
        self.port = port
        self._paths = list(load_paths(engine))

    @property
    def method(self) -> str:
        """The endpoint asked now, or ``tcp``."""
        return self._paths[0] if self._paths else "tcp"

    def count(self) -> int | None:
        """Requests in flight now; None if the engine's endpoint failed this time."""
        while self._paths:
            path = self._paths[0]
            try:
                status, body = self._get(path)
            except (urllib.error.URLError, OSError, ValueError):
                return None
            load: EngineLoad | None = None
            if status == 200:
                try:
                    load = _parse(path, body)
                except ValueError:
                    load = None
            elif status not in ABSENT_STATUSES:
                return None  # a 5xx from a busy engine: ask again
            if load is not None:
                return load.in_flight
            self._paths.pop(0)  # this engine has no such endpoint or series
        return established_connections(self.port)

    def _get(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(self.root + path)  # noqa: S310 - our engine's URL
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(request, timeout=2.0) as response:  # noqa: S310
                return int(response.status), response.read(_MAX_BODY_BYTES)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code), b""


def _parse(path: str, body: bytes) -> EngineLoad | None:
    if path == "/slots":
        return parse_slots(json.loads(body))
    return parse_engine_load(body.decode("utf-8", "replace"))


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
