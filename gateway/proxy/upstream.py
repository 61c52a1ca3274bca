"""One attempt at one upstream, and the three clocks that bound it.

``send`` posts the original bytes with the upstream's own key (the client's key never
leaves the gateway) over the gateway's own HTTP/1.1 client (``http1``, ``pool``);
``attempt`` reads the answer up to what decides it: a plain body whole, a stream up to the
end of its first event (``Primed``), or a ``Failure`` another replica may fix. The clocks:
connecting (the pool's ``connect_timeout_s``), the first event of
a stream or the first byte of a plain body (``first_token_timeout_s``, from sending), and
the silence between chunks after it (``idle_timeout_s``, kept by ``Watch``). None is a
total timeout, and none runs while the gateway waits for a slow client.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.inflight import ShuttingDown
from gateway.logs import LOGGER_NAME, fields
from gateway.proxy.exchange import Exchange
from gateway.proxy.failures import (
    Failure,
    UpstreamTimeout,
    bad_upstream,
    client_detail,
    engine_error_message,
    error_message,
    is_json_object,
    shutting_down,
    timeout_error,
)
from gateway.proxy.http1 import (
    Head,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamUnreachable,
    request_bytes,
)
from gateway.proxy.pool import Pool, endpoint
from gateway.proxy.sse import MAX_CARRY_BYTES, engine_error_at
from gateway.proxy.usage import note_usage, read_usage
from gateway.routes import Upstream
from hpc.masking import mask
from hpc.openai import API_PREFIX

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # aiohttp itself depends on async-timeout before Python 3.11
    from async_timeout import timeout_at  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger(f"{LOGGER_NAME}.proxy")


@dataclass(frozen=True, slots=True)
class Sent:
    """An upstream's answer whose head is in; its body is read from ``conn``."""

    conn: UpstreamConnection
    head: Head


@dataclass(frozen=True, slots=True)
class Primed:
    """A stream whose status and first whole event are in: it is safe to commit the 200."""

    first: bytes


async def send(
    pool: Pool,
    upstream: Upstream,
    suffix: str,
    body: bytes,
    request_id: str,
    first_byte_by: float,
    *,
    at_root: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Sent | str:
    """The upstream's connection with the answer's head in, or the error code if it cannot
    be reached: ``upstream_connect_timeout`` or ``upstream_unavailable``.
    ``suffix`` follows the upstream's OpenAI root, or with ``at_root`` its root (the root
    without its ``/v1``); ``headers`` go on besides the gateway's own (a form's
    Content-Type, ``anthropic-version``).
    ``asyncio.TimeoutError`` if the head is not in by ``first_byte_by`` (loop time: the
    time-to-first-token clock); ``UpstreamProtocolError`` if the answer is not HTTP.
    """
    try:
        target = endpoint(upstream.base_url, upstream.tls_sha256)
        root = target.path
        if at_root and root.endswith(API_PREFIX):
            root = root[: -len(API_PREFIX)]
        sent_headers = _upstream_headers(upstream, request_id)
        if headers:
            sent_headers.update(headers)
        data = request_bytes("POST", root + suffix, target.host_header, sent_headers, body)
        async with timeout_at(first_byte_by):
            return Sent(*await pool.request(target, data))
    except (UpstreamUnreachable, UpstreamClosed) as exc:
        error: UpstreamError = exc
    log.warning(
        "upstream unreachable",
        extra=fields(
            request_id=request_id,
            model=upstream.model,
            upstream=upstream.source,
            base_url=upstream.base_url,
            error=f"{type(error).__name__}: {error}",
        ),
    )
    if isinstance(error, UpstreamConnectTimeout):
        return "upstream_connect_timeout"
    return "upstream_unavailable"


def _upstream_headers(upstream: Upstream, request_id: str) -> dict[str, str]:
    headers = {
        # The body parsed as JSON, whatever the client labelled it (curl -d says form data).
        "Content-Type": "application/json",
        # Uncompressed: the bytes are relayed as they come, and the links are local.
        "Accept-Encoding": "identity",
        "Accept": "application/json, text/event-stream",
        "X-Request-Id": request_id,
    }
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


async def attempt(
    config: GatewayConfig,
    sent: Sent,
    upstream: Upstream,
    stream: bool,
    exchange: Exchange,
    first_byte_by: float,
) -> web.StreamResponse | Primed | Failure:
    """The final answer, a stream ready to relay, or a failure another replica may fix."""
    conn, head = sent.conn, sent.head
    if head.status in (401, 403):
        # The upstream refused the gateway's key, not the client's: passing the status on
        # would tell the client its own key is wrong.
        return bad_upstream(
            upstream, f"it answered {head.status} to the gateway's key (stale record?)"
        )
    if stream and head.status == 200 and head.content_type == "text/event-stream":
        return await _first_event(conn, upstream, first_byte_by, config, exchange)
    try:
        body = await _read_body(conn, first_byte_by, config.idle_timeout_s)
    except UpstreamTimeout as exc:
        return timeout_error(upstream, exc.code, config)
    except ShuttingDown:
        return shutting_down(config)
    except UpstreamError as exc:
        return Failure(
            502, "upstream_error", f"upstream {upstream.source} failed: {type(exc).__name__}"
        )
    exchange.upstream_first_at = time.monotonic()
    if head.status >= 400 and upstream.api_key:
        # An engine that echoes what it was sent must not hand the job's key to the client
        # or to the log (hpc.masking: every form of it; the JSON stays valid).
        body = mask(body.decode("utf-8", "replace"), upstream.api_key).encode()
    headers = {"Content-Type": head.headers.get("content-type", "application/json")}
    retry_after = head.headers.get("retry-after")
    if head.status >= 500:
        message = f"upstream {upstream.source} answered {head.status}"
        if is_json_object(body):
            detail = error_message(body)
            shown = client_detail(detail)
            message += f": {shown}" if shown else " (its message is in the gateway's log)"
        else:
            detail = None
        if head.status == 503:
            return Failure(
                503, "upstream_unavailable", message, retry_after or "1", log_detail=detail
            )
        return Failure(
            502,
            "upstream_error",
            message,
            against_replica=head.status in (502, 504),
            log_detail=detail,
        )
    if head.status >= 400:
        if not is_json_object(body):
            return bad_upstream(upstream, f"it answered {head.status} without a JSON error")
        if retry_after is not None and head.status == 429:
            headers["Retry-After"] = retry_after
    if head.status == 200:
        at = body.rfind(b'"usage"')
        usage = read_usage(body, at) if at >= 0 else None
        if usage is not None:
            note_usage(exchange, usage)
    return web.Response(status=head.status, body=body, headers=headers)


async def _first_event(
    conn: UpstreamConnection,
    upstream: Upstream,
    first_byte_by: float,
    config: GatewayConfig,
    exchange: Exchange,
) -> web.StreamResponse | Primed | Failure:
    """Read up to the end of the stream's first event, before the client is promised a 200.

    A stream that ends or breaks first, or whose first event is the engine's error, has
    sent the client nothing yet: another replica may still answer it whole. An SSE comment
    (``: loading …``, a swap pool loading the model) is a first event like any other: it
    commits the 200 and stops this clock, and an error after it is relayed in-band.
    """
    data = b""
    try:
        async with timeout_at(first_byte_by):
            while b"\n\n" not in data and b"\r\n\r\n" not in data:
                if len(data) >= MAX_CARRY_BYTES:
                    break
                chunk = await conn.read()
                if not chunk:
                    return Failure(
                        502,
                        "upstream_error",
                        f"upstream {upstream.source} ended the stream before its first event",
                    )
                if not data:
                    exchange.upstream_first_at = time.monotonic()
                data += chunk
    except asyncio.TimeoutError:
        return timeout_error(upstream, "upstream_first_token_timeout", config)
    except ShuttingDown:
        return shutting_down(config)
    except UpstreamError as exc:
        return Failure(
            502,
            "upstream_error",
            f"upstream {upstream.source} broke off the stream before its first event "
            f"({type(exc).__name__})",
        )
    if engine_error_at(data.lstrip()) == 0:
        message = engine_error_message(data.lstrip().split(b"\n\n", 1)[0])
        return Failure(502, "upstream_error", f"upstream {upstream.source} reported: {message}")
    return Primed(data)


async def _read_body(conn: UpstreamConnection, first_byte_by: float, idle_s: float) -> bytes:
    """The whole body: its first byte by ``first_byte_by``, no gap after it over ``idle_s``."""
    parts: list[bytes] = []
    code = "upstream_first_token_timeout"
    deadline = first_byte_by
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with timeout_at(deadline):
                chunk = await conn.read()
        except asyncio.TimeoutError:
            raise UpstreamTimeout(code) from None
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        code = "upstream_idle_timeout"
        deadline = loop.time() + idle_s


class Watch:
    """Bounds the upstream's silence in a stream while the gateway waits for it.

    One timer per stream that wakes up about once per limit, instead of a timer armed and
    cancelled around every piece (a few microseconds per chunk): the relay only notes since
    when it has been waiting. When a wait passes ``idle_s``, the upstream's body is failed
    with ``UpstreamTimeout``, which ends the relay. The watch starts once the first
    event is in (``_first_event`` keeps the time-to-first-token clock until then).
    """

    __slots__ = ("_conn", "_handle", "_idle_s", "_loop", "waiting_since")

    def __init__(self, conn: UpstreamConnection, idle_s: float) -> None:
        self._conn = conn
        self._idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self.waiting_since: float | None = None
        self._handle = self._loop.call_at(self._loop.time() + idle_s, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.waiting_since
        if since is None:
            # Not waiting for the upstream (writing to a slow client, say): no silence yet.
            self._handle = self._loop.call_at(now + self._idle_s, self._check)
            return
        limit_at = since + self._idle_s
        if now < limit_at:
            self._handle = self._loop.call_at(limit_at, self._check)
            return
        self._conn.set_exception(UpstreamTimeout("upstream_idle_timeout"))

    def close(self) -> None:
        """Stop the timer."""
        self._handle.cancel()
