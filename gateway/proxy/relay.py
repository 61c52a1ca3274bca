"""The SSE relay: an upstream's stream passed on event by event as it arrives.

Once the 200 is committed, the upstream's body is *pushed* (``http1``): each piece is
handled inside the upstream connection's ``data_received`` by ``Splice.feed`` and written to
the client's transport as one HTTP chunk in the same callback, so a chunk costs no task
wake-up and no await, which is what makes the gateway cheaper per chunk than a bare aiohttp
pass-through. The handler's coroutine only waits for the end, or drains a slow client.

No per-chunk JSON parsing: only the last few bytes are kept, to see whether
``data: [DONE]`` came, and an incomplete trailing event waits for its end. A stream that
breaks after the 200, or ends without ``[DONE]`` (the route's own end mark: ``apis``),
gets an in-band ``data: {"error": …}`` event (Anthropic's ``event: error`` on its routes)
and no ``[DONE]``, so a client can tell a cut answer from a whole one; so does an
engine's own in-band error event (found by a bytes search for ``{"error"``).

Back-pressure: when the client's transport buffer passes its high-water mark, the upstream
connection stops reading (TCP pushes back on the engine) until the client has drained; the
idle clock does not run meanwhile, so a slow client never counts as a silent upstream.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.inflight import SHUTTING_DOWN, ShuttingDown
from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import Gaps
from gateway.proxy.exchange import Exchange
from gateway.proxy.failures import (
    UpstreamTimeout,
    engine_error_message,
    timeout_message,
)
from gateway.proxy.http1 import UpstreamConnection
from gateway.proxy.sse import (
    ERROR_KEY,
    MAX_CARRY_BYTES,
    TAIL_BYTES,
    engine_error_at,
    event_separator,
)
from gateway.proxy.upstream import Watch
from gateway.proxy.usage import (
    USAGE_MARKS,
    USAGE_SENDERS,
    content_events,
    stream_id,
    take_usage,
    usage_event,
)
from gateway.routes import Upstream
from gateway.state import CONFIG, METRICS, RequestInfo
from hpc.openai import DONE, SSE_HEADERS

log = logging.getLogger(f"{LOGGER_NAME}.proxy")

_DRAIN_POLL_S = 0.005


class Splice:
    """The per-piece work of the relay, run inside the upstream's ``data_received``.

    It is the upstream connection's ``BodySink``: ``feed`` gets each piece of the body,
    ``end`` its end. The handler's coroutine sleeps in ``wait`` until the stream is over
    (``finished``) or the client's buffer is full (``paused``).
    """

    __slots__ = (
        "_client",
        "_conn",
        "_count",
        "_exchange",
        "_framed",
        "_gaps",
        "_high_water",
        "_last",
        "_loop",
        "_strip_usage",
        "_upstream",
        "_waiter",
        "_watch",
        "carry",
        "client_gone",
        "counted",
        "delivered",
        "ended",
        "failure",
        "finished",
        "held",
        "paused",
        "tail",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        framed: bool,
        conn: UpstreamConnection,
        watch: Watch,
        gaps: Gaps,
        upstream: Upstream,
        strip_usage: bool,
        exchange: Exchange,
        count: bool = False,
    ) -> None:
        """``count``: count the events that carry text and hold back ``[DONE]`` while no
        usage event has come (the client asked for one; the engine may send none)."""
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._framed = framed  # HTTP/1.1 chunked framing; an HTTP/1.0 client gets raw bytes
        self._high_water = client.get_write_buffer_limits()[1]
        self._conn = conn
        self._watch = watch
        self._gaps = gaps
        self._upstream = upstream
        self._strip_usage = strip_usage
        self._exchange = exchange
        self._count = count
        self.counted = 0  # events with text, while counting
        self.held = b""  # the engine's [DONE] event, held back for the gateway's usage event
        self._waiter: asyncio.Future[None] | None = None
        self._last = 0.0
        self.tail = b""
        self.carry = b""
        self.failure: tuple[str, str] | None = None  # (message, code): the engine's error
        self.ended: BaseException | None = None  # what ended the upstream's body, if it failed
        self.finished = False
        self.paused = False
        self.client_gone = False
        self.delivered = False  # the API's last event has gone to the client

    def feed(self, data: bytes) -> None:
        """One piece of the body: hold back an incomplete event, look for the engine's
        error and the usage, write the rest to the client."""
        if self.finished:
            return
        now = self._loop.time()
        if self._last:
            self._gaps.add(now - self._last)
        self._last = now
        chunk = self.carry + data if self.carry else data
        self.carry = b""
        if not chunk.endswith(b"\n\n"):
            # Hold back an incomplete last event until its end comes: a client cannot use
            # half an event, and the usage event must be whole to be read.
            cut = max(chunk.rfind(b"\n\n"), chunk.rfind(b"\n\r\n"))
            if cut < 0 and len(chunk) < MAX_CARRY_BYTES:
                self.carry = chunk
                if not self.paused:
                    self._watch.waiting_since = now
                return
            if cut >= 0:
                end = cut + (2 if chunk[cut + 1 : cut + 2] == b"\n" else 3)
                chunk, self.carry = chunk[:end], chunk[end:]
        if ERROR_KEY in chunk:
            at = engine_error_at(chunk)
            if at >= 0:
                # The engine reports its own failure in-band: what came before it is
                # relayed, the error is passed on in the gateway's shape, and the stream
                # ends there without [DONE], whatever the engine sends after it.
                message = engine_error_message(chunk[at:].split(b"\n\n", 1)[0])
                source = self._upstream.source
                self.failure = (f"upstream {source} reported: {message}", "upstream_error")
                chunk, self.carry = chunk[:at], b""
        if USAGE_MARKS[0] in chunk or USAGE_MARKS[1] in chunk:
            chunk = take_usage(chunk, self._strip_usage, self._exchange)
        if self._count and self._exchange.completion_tokens is None:
            chunk = self._counted(chunk)
        if chunk:
            self._write(chunk)
        if self.failure is not None:
            self._conn.pause_reading()  # nothing more is wanted from it; it will be closed
            self._finish()
        elif not self.paused:
            self._watch.waiting_since = now

    def _counted(self, chunk: bytes) -> bytes:
        """Count ``chunk``'s tokens; hold back its closing ``[DONE]`` event, if it has one."""
        self.counted += content_events(chunk)
        at = chunk.rfind(DONE)
        if at >= 0 and chunk[at - 1 : at] in (b"", b"\n") and chunk[at:].rstrip() == DONE:
            self.held = chunk[at:]
            return chunk[:at]
        return chunk

    def hold_last_done(self) -> None:
        """At the end: a ``[DONE]`` left without its blank line (in ``carry``) is held too."""
        if self._count and not self.held and self.carry.strip() == DONE:
            self.held, self.carry = self.carry, b""

    def end(self, exc: BaseException | None) -> None:
        """The upstream's body ended: whole (``None``), or with ``exc``."""
        if not self.finished:
            self.ended = exc
            self._finish()

    def _write(self, chunk: bytes) -> None:
        client = self._client
        if client.is_closing():
            self.client_gone = True
            self._finish()
            return
        if self._framed:
            client.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            client.write(chunk)
        self._exchange.events_relayed += chunk.count(b"\n\n")
        self.tail = (self.tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
        if not self.delivered and self._exchange.api.last_events:
            self.delivered = self._exchange.api.delivered(chunk)
        if client.get_write_buffer_size() > self._high_water and not self.paused:
            # The client reads slower than the engine writes: stop reading the upstream
            # until the handler has drained the client (the idle clock stops too).
            self.paused = True
            self._watch.waiting_since = None
            self._conn.pause_reading()
            self._wake()

    def resume(self) -> None:
        """The client has drained: read the upstream again."""
        self.paused = False
        self._watch.waiting_since = self._loop.time()
        self._conn.resume_reading()

    def _finish(self) -> None:
        self.finished = True
        self._watch.waiting_since = None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until the stream is over or the client's buffer is full."""
        if self.finished or self.paused:
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


async def relay_stream(
    request: web.Request,
    conn: UpstreamConnection,
    upstream: Upstream,
    first: bytes,
    strip_usage: bool,
    info: RequestInfo,
    exchange: Exchange,
) -> web.StreamResponse:
    """Commit the 200 and relay ``first`` (already read) and the rest of the stream; into
    the exchange's stream if it is open already (an on-demand wait sent keep-alives on it)."""
    out = exchange.out
    if out is None:
        out = exchange.out = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await out.prepare(request)  # a StreamResponse sends its headers here
    transport = request.transport
    if transport is None or transport.is_closing():
        info.outcome = "client_disconnected"
        return out
    config = request.app[CONFIG]
    watch = Watch(conn, config.idle_timeout_s)
    gaps = Gaps()
    # aiohttp chose the framing when it sent the headers: chunked for HTTP/1.1 clients.
    framed = "chunked" in out.headers.get("Transfer-Encoding", "")
    senders = request.app[USAGE_SENDERS]
    # Counting costs a search per event: only for a client that asked for the usage, from
    # a replica not known to send it.
    count = exchange.wants_usage and not senders.sends(upstream.source)
    splice = Splice(transport, framed, conn, watch, gaps, upstream, strip_usage, exchange, count)
    try:
        return await _relay(out, transport, conn, splice, first, upstream, info, exchange, config)
    except asyncio.CancelledError:
        if splice.delivered:
            # The client closed after the last event reached it: its answer is whole.
            info.delivered = True
            info.outcome = "client_closed_after_end"
        raise
    finally:
        if exchange.completion_tokens is not None and not exchange.usage_estimated:
            senders.note(upstream.source)
        watch.close()
        request.app[METRICS].inter_token_latency.merge(upstream.model, gaps.counts, gaps.total)


async def _relay(
    out: web.StreamResponse,
    transport: asyncio.Transport,
    conn: UpstreamConnection,
    splice: Splice,
    first: bytes,
    upstream: Upstream,
    info: RequestInfo,
    exchange: Exchange,
    config: GatewayConfig,
) -> web.StreamResponse:
    """Feed ``first``, then let the upstream push the rest; drain a slow client; end."""
    loop = asyncio.get_running_loop()
    splice.feed(first)
    exchange.client_first_at = loop.time()
    if not splice.finished:
        conn.push_to(splice)  # what arrived meanwhile, then every piece as it comes
    while not splice.finished:
        await splice.wait()
        if splice.paused and not splice.finished:
            if not await _drained(transport):
                splice.client_gone = True
                break
            splice.resume()
    if splice.client_gone:
        info.outcome = "client_disconnected"
        return out
    tail = splice.tail
    if exchange.completion_tokens is None:
        splice.hold_last_done()
    if splice.held:
        tail = (tail + splice.held)[-TAIL_BYTES:]  # the engine ended its stream whole
    failure = splice.failure or _failure(splice.ended, tail, upstream, config, exchange)
    try:
        if splice.held and failure is None:
            # The engine sent no usage event: the gateway's, then the engine's [DONE].
            event = b""
            if exchange.completion_tokens is None:
                event = usage_event(exchange, splice.counted, stream_id(first))
            await out.write(event + splice.held)
        if splice.carry and failure is None:
            await out.write(splice.carry)
            tail = (tail + splice.carry[-TAIL_BYTES:])[-TAIL_BYTES:]
        api = exchange.api
        if failure is None and not api.whole(tail):
            end = (api.stream_end or b"").decode()
            failure = (
                f"upstream {upstream.source} ended the stream without {end}",
                "upstream_error",
            )
        if failure is not None:
            message, code = failure
            info.outcome = code
            log.warning(
                "stream failed",
                extra=fields(request_id=info.request_id, upstream=upstream.source, error=message),
            )
            event = api.error_event(message, code)
            await out.write(event_separator(tail) + event)
        await out.write_eof()
    except ConnectionResetError:
        info.outcome = "client_disconnected"
    return out


async def _drained(transport: asyncio.Transport) -> bool:
    """Wait until the client's buffer is down to its low-water mark; False if it left.

    Polled: this runs only while a client reads slower than its engine writes, and aiohttp
    offers no public wait for a transport's buffer (``StreamResponse.drain`` is deprecated).
    """
    low = transport.get_write_buffer_limits()[0]
    while transport.get_write_buffer_size() > low:
        if transport.is_closing():
            return False
        await asyncio.sleep(_DRAIN_POLL_S)
    return not transport.is_closing()


def _failure(
    ended: BaseException | None,
    tail: bytes,
    upstream: Upstream,
    config: GatewayConfig,
    exchange: Exchange,
) -> tuple[str, str] | None:
    """What the client is told of an upstream body that ended with ``ended``."""
    if ended is None:
        return None
    if isinstance(ended, UpstreamTimeout):
        return timeout_message(upstream, ended.code, config), ended.code
    if isinstance(ended, ShuttingDown):
        return SHUTTING_DOWN, "gateway_shutting_down"
    if exchange.api.stream_end is not None and exchange.api.whole(tail):
        # The engine said the stream is whole, then botched the end of the HTTP body
        # (llama-cpp-python's server does, after an interrupt): the client has its whole
        # answer, and an error after [DONE] would contradict it.
        return None
    reason = type(ended).__name__
    return f"upstream {upstream.source} broke off the stream ({reason})", "upstream_error"
