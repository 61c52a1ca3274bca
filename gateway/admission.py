"""Admission control: caps on proxied requests in flight, per model and for the gateway.

A request past a cap is refused at once with 503 and ``Retry-After`` rather than queued,
so an overloaded model sheds load instead of collapsing under it (engines slow down for
everyone when they take more than they can batch). The gateway-wide cap is checked before
a request's body is read, and counts requests whose bodies are still arriving: clients that
send headers and then trickle their bodies cannot hold more than the cap between them (the
body timeout ends each of them). Counting is a few integer updates per request: no locks
(one event loop) and no I/O.

With several gateway replicas the caps hold for all of them through Redis
(``gateway.redislimits``); each replica still counts its own requests here, which is what
its caps are checked against while Redis is unreachable, and what bounds the bodies it reads.
"""

from __future__ import annotations


class Admission:
    """Requests in flight through the proxy, checked against the configured caps."""

    __slots__ = ("_max_per_model", "_max_total", "_per_model", "reading", "total")

    def __init__(self, max_total: int | None, max_per_model: int | None) -> None:
        self._max_total = max_total
        self._max_per_model = max_per_model
        self._per_model: dict[str, int] = {}
        self.total = 0
        self.reading = 0  # requests whose bodies are still being read

    def start_reading(self) -> bool:
        """Before a request's body is read: False if the gateway is full (refuse it before
        reading anything), else a reading slot the caller gives back with ``stop_reading``."""
        if self._max_total is not None and self.total + self.reading >= self._max_total:
            return False
        self.reading += 1
        return True

    def stop_reading(self) -> None:
        """The body is read (or the request gave up); the slot ``start_reading`` took."""
        self.reading -= 1

    def enter(self, model: str) -> str | None:
        """Take a slot for ``model``: None if admitted, else which cap is full (``gateway``
        or ``model``). An admitted request must ``leave`` exactly once."""
        if self._max_total is not None and self.total >= self._max_total:
            return "gateway"
        count = self._per_model.get(model, 0)
        if self._max_per_model is not None and count >= self._max_per_model:
            return "model"
        self._per_model[model] = count + 1
        self.total += 1
        return None

    def take(self, model: str) -> None:
        """Count a request for ``model`` admitted elsewhere (the shared caps in Redis),
        whatever the caps here; it must ``leave`` exactly once."""
        self._per_model[model] = self._per_model.get(model, 0) + 1
        self.total += 1

    def leave(self, model: str) -> None:
        """Give back the slot ``enter`` took; a model with none in flight is forgotten."""
        self.total -= 1
        count = self._per_model[model] - 1
        if count:
            self._per_model[model] = count
        else:
            del self._per_model[model]

    def in_flight(self, model: str) -> int:
        """Requests for ``model`` in flight now."""
        return self._per_model.get(model, 0)
