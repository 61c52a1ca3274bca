"""The proxied requests in flight, so that a shutdown can end them cleanly after its grace.

On SIGTERM the server stops accepting and waits up to ``shutdown_grace_s`` for requests to
finish; the ones still running then are ended here rather than cut. A request that has an
upstream response is ended through it: its upstream stream is failed with
``ShuttingDown``, which the pending read raises, so a stream gets an in-band
``gateway_shutting_down`` error event before its connection closes, and a request that
has not answered yet gets a 503. A request still waiting for the upstream's headers (a
non-streaming answer, say) is cancelled, and answers the 503 itself when it sees that the
shutdown, not its client, cancelled it.

Bookkeeping is one dict insert and delete per request; nothing per chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

SHUTTING_DOWN = "the gateway is shutting down; send the request again"


class ShuttingDown(Exception):
    """Raised by an upstream read when the gateway ends the request for its shutdown."""


class UpstreamBody(Protocol):
    """What ``end_all`` needs of an upstream's body (``gateway.proxy.http1``'s connection)."""

    def set_exception(self, exc: BaseException) -> None:
        """End the body with ``exc``."""

    def exception(self) -> BaseException | None:
        """What ended the body, if it failed."""

    def at_eof(self) -> bool:
        """True once the body has ended."""


class Inflight:
    """Tasks of proxied requests, each with the upstream body it is reading, if any."""

    def __init__(self) -> None:
        self._requests: dict[asyncio.Task[Any], UpstreamBody | None] = {}
        self._cancelled: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._requests)

    def enter(self, task: asyncio.Task[Any]) -> None:
        """``task`` is now proxying a request."""
        self._requests[task] = None

    def reading(self, task: asyncio.Task[Any], content: UpstreamBody | None) -> None:
        """``task`` now reads ``content`` (an upstream response's body), or nothing."""
        if task in self._requests:
            self._requests[task] = content

    def leave(self, task: asyncio.Task[Any]) -> None:
        """``task``'s request is done, however it ended."""
        self._requests.pop(task, None)
        self._cancelled.discard(task)

    def cancelled_by_shutdown(self, task: asyncio.Task[Any]) -> bool:
        """True if ``end_all`` cancelled ``task`` (not its client leaving)."""
        return task in self._cancelled

    def end_all(self) -> int:
        """End every request still in flight (see the module docstring); how many."""
        for task, content in list(self._requests.items()):
            if content is not None and content.exception() is None and not content.at_eof():
                content.set_exception(ShuttingDown())
            else:
                self._cancelled.add(task)
                task.cancel()
        return len(self._requests)
