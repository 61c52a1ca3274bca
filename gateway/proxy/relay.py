"""The SSE relay: an upstream's stream passed on event by event as it arrives.

No per-chunk JSON parsing: only the last few bytes are kept, to see whether
``data: [DONE]`` came, and an incomplete trailing event waits for its end. A stream that
breaks after the 200, or ends without ``[DONE]``, gets an in-band ``data: {"error": …}``
event and no ``[DONE]``, so a client can tell a cut answer from a whole one; so does an
engine's own in-band error event (found by a bytes search for ``{"error"``).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.inflight import ShuttingDown
from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import Gaps
from gateway.proxy.exchange import Exchange
from gateway.proxy.failures import (
    SHUTTING_DOWN,
    UpstreamTimeout,
    engine_error_message,
    timeout_message,
)
from gateway.proxy.sse import (
    ERROR_KEY,
    MAX_CARRY_BYTES,
    TAIL_BYTES,
    ends_done,
    engine_error_at,
    event_separator,
)
from gateway.proxy.upstream import Watch
from gateway.proxy.usage import USAGE_MARKS, take_usage
from gateway.routes import Upstream
from gateway.state import CONFIG, METRICS, RequestInfo
from hpc.openai import SERVER_ERROR, SSE_HEADERS, error_body, error_event

log = logging.getLogger(f"{LOGGER_NAME}.proxy")


async def relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
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
        await out.prepare(request)
    config = request.app[CONFIG]
    content = response.content
    watch = Watch(content, config.idle_timeout_s)
    gaps = Gaps()
    try:
        return await _relay_events(
            out, content, first, watch, gaps, upstream, strip_usage, info, exchange, config
        )
    finally:
        watch.close()
        request.app[METRICS].inter_token_latency.merge(upstream.model, gaps.counts, gaps.total)


async def _relay_events(
    out: web.StreamResponse,
    content: aiohttp.StreamReader,
    first: bytes,
    watch: Watch,
    gaps: Gaps,
    upstream: Upstream,
    strip_usage: bool,
    info: RequestInfo,
    exchange: Exchange,
    config: GatewayConfig,
) -> web.StreamResponse:
    """The SSE loop: read, hold back an incomplete event, look for errors and usage, write."""
    loop = asyncio.get_running_loop()
    tail = b""
    carry = b""
    failure: tuple[str, str] | None = None
    pending = first
    last_read = 0.0
    while True:
        if pending:
            chunk, pending = pending, b""
        else:
            # readany() is what iter_any() loops over; calling it here keeps the upstream's
            # errors (reads) apart from the client's (writes), and the watch times the wait
            # for the upstream only: a slow client pauses the upstream, not the clock.
            # A read starts right after the last chunk was written, so the time between
            # two reads is the gap between two chunks relayed (no extra clock call).
            now = watch.waiting_since = loop.time()
            if last_read:
                gaps.add(now - last_read)
            last_read = now
            try:
                chunk = await content.readany()
            except UpstreamTimeout as exc:
                failure = (timeout_message(upstream, exc.code, config), exc.code)
                break
            except ShuttingDown:
                failure = (SHUTTING_DOWN, "gateway_shutting_down")
                break
            except aiohttp.ClientError as exc:
                if ends_done(tail):
                    # The engine said the stream is whole, then botched the end of the
                    # HTTP body (llama-cpp-python's server does, after an interrupt): the
                    # client has its whole answer, and an error after [DONE] would contradict it.
                    break
                failure = (
                    f"upstream {upstream.source} broke off the stream ({type(exc).__name__})",
                    "upstream_error",
                )
                break
            watch.waiting_since = None
            if not chunk:
                break
        if carry:
            chunk, carry = carry + chunk, b""
        if not chunk.endswith(b"\n\n"):
            # Hold back an incomplete last event until its end comes: a client cannot use
            # half an event, and the usage event must be whole to be read.
            cut = max(chunk.rfind(b"\n\n"), chunk.rfind(b"\n\r\n"))
            if cut < 0 and len(chunk) < MAX_CARRY_BYTES:
                carry = chunk
                continue
            if cut >= 0:
                end = cut + (2 if chunk[cut + 1 : cut + 2] == b"\n" else 3)
                chunk, carry = chunk[:end], chunk[end:]
        if ERROR_KEY in chunk:
            at = engine_error_at(chunk)
            if at >= 0:
                # The engine reports its own failure in-band: what came before it is
                # relayed, the error is passed on in the gateway's shape, and the stream
                # ends there without [DONE], whatever the engine sends after it.
                message = engine_error_message(chunk[at:].split(b"\n\n", 1)[0])
                failure = (f"upstream {upstream.source} reported: {message}", "upstream_error")
                chunk, carry = chunk[:at], b""
        if USAGE_MARKS[0] in chunk or USAGE_MARKS[1] in chunk:
            chunk = take_usage(chunk, strip_usage, exchange)
        if chunk:
            try:
                await out.write(chunk)
            except ConnectionResetError:
                info.outcome = "client_disconnected"
                return out
            if not last_read:
                exchange.client_first_at = last_read = loop.time()
            exchange.events_relayed += chunk.count(b"\n\n")
            tail = (tail + chunk[-TAIL_BYTES:])[-TAIL_BYTES:]
        if failure is not None:
            break
    if carry and failure is None:
        try:
            await out.write(carry)
        except ConnectionResetError:
            info.outcome = "client_disconnected"
            return out
        tail = (tail + carry[-TAIL_BYTES:])[-TAIL_BYTES:]
    if failure is None and not ends_done(tail):
        failure = (
            f"upstream {upstream.source} ended the stream without [DONE]",
            "upstream_error",
        )
    try:
        if failure is not None:
            message, code = failure
            info.outcome = code
            log.warning(
                "stream failed",
                extra=fields(request_id=info.request_id, upstream=upstream.source, error=message),
            )
            event = error_event(error_body(message, SERVER_ERROR, code))
            await out.write(event_separator(tail) + event)
        await out.write_eof()
    except ConnectionResetError:
        info.outcome = "client_disconnected"
    return out
