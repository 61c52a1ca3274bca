"""Which replica next: least outstanding requests, skipping replicas that keep failing.

Per replica (by ``Upstream.source``) the balancer counts requests in flight through this
gateway and failures in a row (unreachable, 5xx, or broken before its first event).
``order`` puts the replicas with the fewest requests in flight first (ties broken by the
route table's round robin). A replica that has failed ``FAILURES_TO_SKIP`` times in a row
is put last for a while that doubles with every further failure (``BASE_SKIP_S`` up to
``MAX_SKIP_S``); one success clears it. One failure never moves a healthy replica, and a
skipped one is still tried when nothing else is left.

State survives route-table reloads; the clock is passed in (tests use their own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gateway.routes import Upstream

FAILURES_TO_SKIP = 3
BASE_SKIP_S = 1.0
MAX_SKIP_S = 30.0


class _Replica:
    __slots__ = ("failures", "outstanding", "skip_until")

    def __init__(self) -> None:
        self.outstanding = 0
        self.failures = 0
        self.skip_until = 0.0


class Balancer:
    """Outstanding requests and failure streaks of every replica seen."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}

    def _get(self, source: str) -> _Replica:
        replica = self._replicas.get(source)
        if replica is None:
            replica = self._replicas[source] = _Replica()
        return replica

    def order(self, candidates: Sequence[Upstream]) -> Sequence[Upstream]:
        """``candidates`` best first: not skipped, then fewest in flight, then given order."""
        if len(candidates) <= 1:
            return candidates
        now = self._clock()
        replicas = self._replicas

        def rank(item: tuple[int, Upstream]) -> tuple[bool, int, int]:
            index, upstream = item
            replica = replicas.get(upstream.source)
            if replica is None:
                return (False, 0, index)
            return (replica.skip_until > now, replica.outstanding, index)

        return [upstream for _, upstream in sorted(enumerate(candidates), key=rank)]

    def started(self, upstream: Upstream) -> None:
        """A request is now in flight to ``upstream``."""
        self._get(upstream.source).outstanding += 1

    def finished(self, upstream: Upstream) -> None:
        """A request to ``upstream`` is done, however it ended."""
        self._get(upstream.source).outstanding -= 1

    def failed(self, upstream: Upstream) -> None:
        """``upstream`` could not answer; after a few in a row it is skipped a while."""
        replica = self._get(upstream.source)
        replica.failures += 1
        extra = replica.failures - FAILURES_TO_SKIP
        if extra >= 0:
            skip = min(MAX_SKIP_S, BASE_SKIP_S * 2 ** min(extra, 16))
            replica.skip_until = self._clock() + skip

    def succeeded(self, upstream: Upstream) -> None:
        """``upstream`` answered: its failure streak is over."""
        replica = self._replicas.get(upstream.source)
        if replica is not None and replica.failures:
            replica.failures = 0
            replica.skip_until = 0.0

    def snapshot(self) -> dict[str, tuple[int, bool]]:
        """Per replica: (outstanding, not skipped now), for ``/metrics``."""
        now = self._clock()
        return {s: (r.outstanding, r.skip_until <= now) for s, r in self._replicas.items()}

    def forget_idle(self, keep: set[str]) -> None:
        """Drop replicas no longer routed and with nothing in flight (bounds memory)."""
        for source in [s for s, r in self._replicas.items() if s not in keep and not r.outstanding]:
            del self._replicas[source]
