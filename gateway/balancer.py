"""Which replica next: least loaded first, skipping replicas that fail or fail their probes.

Per replica (by ``Upstream.source``) the balancer keeps what this gateway saw and what the
background prober (``gateway.health``) last stored; ``order`` only reads those numbers, so
the hot path never waits on a probe.

- **Load** is the requests this gateway has in flight to the replica plus the engine's own
  running and waiting requests that are not this gateway's (other gateways and direct
  clients share engines): at each probe, the engine's count minus what this gateway had in
  flight then. Between probes that external part stays as last reported.
- **Passive failures**: a replica that failed (unreachable, 5xx, or broken before its first
  event) ``FAILURES_TO_SKIP`` times in a row is put last for a while that doubles with every
  further failure (``BASE_SKIP_S`` up to ``MAX_SKIP_S``); one success clears it, and failures
  older than ``FAILURE_MEMORY_S`` are forgotten (a streak must be a streak). One failure
  never moves a healthy replica, and a skipped one is still tried when nothing else is left.
- **Probes**: after ``eject_after`` failed probes in a row a replica is ejected: it gets no
  requests while any other replica is usable (if every replica is ejected they are all
  tried: a prober that cannot reach anything must not turn a serving gateway into a wall of
  503s). The first good probe brings it back.

State survives route-table reloads; the clock is passed in (tests use their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gateway.routes import Upstream
from hpc.job.engineload import EngineLoad

FAILURES_TO_SKIP = 3
BASE_SKIP_S = 1.0
MAX_SKIP_S = 30.0
FAILURE_MEMORY_S = 2 * MAX_SKIP_S
EJECT_AFTER = 3


class _Replica:
    __slots__ = (
        "ejected",
        "external",
        "failures",
        "last_failure",
        "load",
        "outstanding",
        "probe_failures",
        "probe_ok",
        "skip_until",
    )

    def __init__(self) -> None:
        self.outstanding = 0
        self.failures = 0
        self.last_failure = 0.0
        self.skip_until = 0.0
        self.probe_ok: bool | None = None  # None: never probed (a static backend)
        self.probe_failures = 0
        self.ejected = False
        self.load: EngineLoad | None = None
        self.external = 0  # the engine's requests that are not this gateway's


class Balancer:
    """Outstanding requests, failure streaks and probe results of every replica seen."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, eject_after: int = EJECT_AFTER
    ) -> None:
        self._clock = clock
        self._eject_after = eject_after
        self._replicas: dict[str, _Replica] = {}

    def _get(self, source: str) -> _Replica:
        replica = self._replicas.get(source)
        if replica is None:
            replica = self._replicas[source] = _Replica()
        return replica

    def order(self, candidates: Sequence[Upstream]) -> Sequence[Upstream]:
        """``candidates`` best first: not skipped, least loaded, then given order.

        Ejected replicas are left out unless every candidate is ejected.
        """
        if len(candidates) <= 1:
            return candidates
        now = self._clock()
        replicas = self._replicas

        def rank(item: tuple[int, Upstream]) -> tuple[bool, bool, int, int]:
            index, upstream = item
            replica = replicas.get(upstream.source)
            if replica is None:
                return (False, False, 0, index)
            return (
                replica.ejected,
                replica.skip_until > now,
                replica.outstanding + replica.external,
                index,
            )

        ranked = sorted(enumerate(candidates), key=rank)
        if self.ejected(ranked[0][1].source):
            return [upstream for _, upstream in ranked]  # all ejected (they sort last)
        return [u for _, u in ranked if not self.ejected(u.source)]

    def ejected(self, source: str) -> bool:
        """True if probes have ejected ``source``."""
        replica = self._replicas.get(source)
        return replica is not None and replica.ejected

    def started(self, upstream: Upstream) -> None:
        """A request is now in flight to ``upstream``."""
        self._get(upstream.source).outstanding += 1

    def finished(self, upstream: Upstream) -> None:
        """A request to ``upstream`` is done, however it ended."""
        self._get(upstream.source).outstanding -= 1

    def failed(self, upstream: Upstream) -> None:
        """``upstream`` could not answer; after a few in a row it is skipped a while."""
        replica = self._get(upstream.source)
        now = self._clock()
        if now - replica.last_failure > FAILURE_MEMORY_S:
            replica.failures = 0
        replica.last_failure = now
        replica.failures += 1
        extra = replica.failures - FAILURES_TO_SKIP
        if extra >= 0:
            skip = min(MAX_SKIP_S, BASE_SKIP_S * 2 ** min(extra, 16))
            replica.skip_until = now + skip

    def succeeded(self, upstream: Upstream) -> None:
        """``upstream`` answered: its failure streak is over."""
        replica = self._replicas.get(upstream.source)
        if replica is not None and replica.failures:
            replica.failures = 0
            replica.skip_until = 0.0

    def probed(self, source: str, ok: bool, load: EngineLoad | None = None) -> None:
        """Store one probe's result: health, and the engine's load if it reports one."""
        replica = self._get(source)
        replica.probe_ok = ok
        if ok:
            replica.probe_failures = 0
            replica.ejected = False
        else:
            replica.probe_failures += 1
            replica.ejected = replica.probe_failures >= self._eject_after
        if load is not None:
            replica.load = load
            replica.external = max(0, load.running + load.waiting - replica.outstanding)
        elif not ok:
            # A replica that cannot answer says nothing of its load; keep no stale queue.
            replica.load = None
            replica.external = 0

    def usable(self, source: str) -> bool:
        """True if ``source`` would be used: not ejected by probes nor skipped for failures."""
        replica = self._replicas.get(source)
        return replica is None or not (replica.ejected or replica.skip_until > self._clock())

    def snapshot(self) -> dict[str, tuple[int, bool]]:
        """Per replica: (outstanding, would be used now), for ``/metrics``."""
        return {s: (r.outstanding, self.usable(s)) for s, r in self._replicas.items()}

    def probes(self) -> dict[str, tuple[bool, tuple[int, int] | None]]:
        """Per probed replica: (last probe good, (running, waiting) if the engine says)."""
        return {
            source: (r.probe_ok, None if r.load is None else (r.load.running, r.load.waiting))
            for source, r in self._replicas.items()
            if r.probe_ok is not None
        }

    def forget_idle(self, keep: set[str]) -> None:
        """Drop replicas no longer routed and with nothing in flight (bounds memory)."""
        for source in [s for s, r in self._replicas.items() if s not in keep and not r.outstanding]:
            del self._replicas[source]
