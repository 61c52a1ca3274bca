"""Forwarding a request to the replicas of its plan: admission, then each replica in turn.

The model's replicas (least outstanding requests first, see ``balancer``), then its
fallbacks', each tried only while nothing has reached the client (what counts as failed
is ``failures``); the answer is relayed as it comes (``relay``) and its tokens charged
(``usage``). The route's ``apis.Api`` says where the engine serves the path and which of
the client's headers and query go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time

from aiohttp import web

from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import Metrics
from gateway.proxy.apis import Api
from gateway.proxy.exchange import Exchange
from gateway.proxy.failures import (
    Failure,
    at_capacity,
    bad_upstream,
    no_route,
    shutting_down,
    timeout_error,
    unhealthy,
    unreachable,
)
from gateway.proxy.http1 import UpstreamError
from gateway.proxy.pool import UPSTREAMS
from gateway.proxy.relay import relay_stream
from gateway.proxy.upstream import Sent, attempt, send
from gateway.proxy.usage import charge, client_wants_usage, with_usage
from gateway.redislimits import SHARED_LIMITS
from gateway.routes import Upstream
from gateway.state import ADMISSION, BALANCER, CONFIG, INFLIGHT, LIVE, METRICS, RequestInfo

log = logging.getLogger(f"{LOGGER_NAME}.proxy")


async def proceed(
    request: web.Request,
    exchange: Exchange,
    body: bytes,
    stream: bool,
    info: RequestInfo,
    plan: list[str],
    candidates: tuple[Upstream, ...] | None,
) -> tuple[web.StreamResponse, str | None]:
    """Admit, then forward to the replicas of each name in ``plan`` in turn (the model, then
    its fallbacks); the answer, and the replica that gave it (None if none did).
    ``candidates``, if given, are the first name's replicas (an on-demand wait found them
    ready)."""
    config = request.app[CONFIG]
    routes = request.app[LIVE].snapshot.routes
    payload = exchange.payload
    model = payload["model"]
    canonical = plan[0]
    strip_usage = False
    if stream and exchange.api.force_usage:
        exchange.wants_usage = client_wants_usage(payload)  # before with_usage turns it on
        body, strip_usage = with_usage(payload, body)

    admission = request.app[ADMISSION]
    shared = request.app.get(SHARED_LIMITS)  # the caps of every replica, in Redis
    if shared is None:
        full, slot = admission.enter(canonical), 0
    else:
        full, slot = await shared.enter(canonical)
    if full is not None:
        return at_capacity(model[:200], full, config.retry_after_s), None
    inflight = request.app[INFLIGHT]
    task = asyncio.current_task()
    if task is not None:
        inflight.enter(task)
    try:
        failure: Failure | None = None
        for served in plan:
            replicas = candidates if candidates and served == canonical else routes.pick(served)
            if not replicas:
                continue
            info.served_model = served
            # The engine knows its model by its own name, not by an alias or the name
            # the client asked for; only then is the body re-serialized.
            served_body = body if served == model else _renamed(exchange, body, served)
            answer = await _forward(
                request, replicas, served_body, stream, strip_usage, info, exchange
            )
            if not isinstance(answer, Failure):
                if served != canonical:
                    request.app[METRICS].fallbacks[(canonical, served)] += 1
                response, upstream = answer
                return response, upstream.source
            failure = answer
        if failure is None:  # not reached: the table is immutable, and checked above
            return no_route(routes, model[:200], canonical, config.retry_after_s), None
        info.upstream = None
        info.outcome = failure.code
        return failure.response(), None
    except asyncio.CancelledError:
        if task is None or not inflight.cancelled_by_shutdown(task):
            raise  # the client left: the connection just closes
        if sys.version_info >= (3, 11):
            task.uncancel()
        info.outcome = "gateway_shutting_down"
        refusal = shutting_down(config)
        if exchange.out is not None:
            # A stream's 200 is out (an on-demand wait's keep-alives): end it in-band.
            body = refusal.body if isinstance(refusal.body, bytes) else b""
            await end_open_stream(exchange.out, exchange.api, body)
            return exchange.out, None
        return refusal, None
    finally:
        if shared is None:
            admission.leave(canonical)
        else:
            shared.leave(canonical, slot)
        if task is not None:
            inflight.leave(task)


def _renamed(exchange: Exchange, body: bytes, model: str) -> bytes:
    if exchange.form is not None:
        return exchange.form.renamed(body, model)
    return json.dumps({**exchange.payload, "model": model}).encode("utf-8")


async def _forward(
    request: web.Request,
    candidates: tuple[Upstream, ...],
    body: bytes,
    stream: bool,
    strip_usage: bool,
    info: RequestInfo,
    exchange: Exchange,
) -> tuple[web.StreamResponse, Upstream] | Failure:
    """Send to the best replica; on to the next while nothing has reached the client.

    A replica that cannot be reached, answers 5xx, breaks before its first event, or opens
    its stream with an error event is passed over (and counted against it by the balancer);
    the client gets the last replica's failure if none answers. 4xx and timeouts are final:
    the client's request is at fault, or the time-to-first-token clock has run out. When
    every replica failed, the last failure is returned (the caller may try a fallback);
    otherwise the answer and the replica that gave it.
    """
    config = request.app[CONFIG]
    pool = request.app[UPSTREAMS]
    balancer = request.app[BALANCER]
    metrics = request.app[METRICS]
    inflight = request.app[INFLIGHT]
    task = asyncio.current_task()
    api = exchange.api
    suffix = api.suffix
    if api.keep_query and request.query_string:
        suffix += "?" + request.rel_url.raw_query_string
    headers = _passed_headers(request, api) if api.passes_headers else None
    loop = asyncio.get_running_loop()
    model = candidates[0].model
    failure = unreachable("upstream_unavailable", model, len(candidates), config)
    ordered = balancer.order(candidates)
    limit_s = config.first_token_timeout_s
    # Every replica fails its health probes (they sort last, so the first says it): one is
    # still tried, in case the probes are wrong, but on a short clock, so that a hung engine
    # costs the client seconds and a 503 naming the model, not the full first-token timeout.
    unhealthy_all = bool(ordered) and balancer.ejected(ordered[0].source)
    if unhealthy_all:
        ordered = ordered[:1]
        limit_s = min(limit_s, config.unhealthy_first_token_timeout_s)
    for upstream in ordered:
        info.upstream = upstream.source
        balancer.started(upstream)
        sent: Sent | str | None = None
        try:
            sent_at = exchange.sent_at = time.monotonic()
            # The time-to-first-token clock runs from here to the first byte of the body.
            first_byte_by = loop.time() + limit_s
            try:
                sent = await send(
                    pool,
                    upstream,
                    suffix,
                    body,
                    info.request_id,
                    first_byte_by,
                    at_root=api.at_root,
                    headers=headers,
                )
            except asyncio.TimeoutError:
                if unhealthy_all:
                    return unhealthy(model, limit_s, config.retry_after_s), upstream
                return timeout_error(upstream, "upstream_first_token_timeout", config), upstream
            except UpstreamError as exc:
                return bad_upstream(upstream, f"{type(exc).__name__}: {exc}"), upstream
            if isinstance(sent, str):
                failure = unreachable(sent, model, len(candidates), config)
                balancer.failed(upstream)
                metrics.upstream_failures[upstream.source] += 1
                continue
            if task is not None:
                inflight.reading(task, sent.conn)
            metrics.upstream_latency.observe(model, time.monotonic() - sent_at)
            answer = await attempt(config, sent, upstream, stream, exchange, first_byte_by)
            if unhealthy_all and isinstance(answer, web.Response) and answer.status == 504:
                # The short clock ran out (attempt's only 504s are its clocks).
                return unhealthy(model, limit_s, config.retry_after_s), upstream
            if isinstance(answer, Failure):
                failure = answer
                if answer.against_replica:
                    balancer.failed(upstream)
                metrics.upstream_failures[upstream.source] += 1
                log.warning(
                    "upstream failed before the first byte",
                    extra=fields(
                        request_id=info.request_id,
                        upstream=upstream.source,
                        status=answer.status,
                        error=answer.message,
                        detail=answer.log_detail,
                    ),
                )
                continue
            balancer.succeeded(upstream)
            if isinstance(answer, web.StreamResponse):
                exchange.client_first_at = time.monotonic()
                _observe_timing(metrics, info, exchange, model)
                charge(metrics, info, exchange, stream=False)
                return answer, upstream
            if api.sticky:
                exchange.first = answer.first
            try:
                relayed = await relay_stream(
                    request, sent.conn, upstream, answer.first, strip_usage, info, exchange
                )
                return relayed, upstream
            finally:
                _observe_timing(metrics, info, exchange, model)
                charge(metrics, info, exchange, stream=True)
        finally:
            if isinstance(sent, Sent):
                if task is not None:
                    inflight.reading(task, None)
                # A connection whose answer was read whole goes back to the pool; anything
                # else (a cut stream, a client that left, a cancelled handler) closes it,
                # which is what tells the engine to stop generating.
                pool.release(sent.conn)
            balancer.finished(upstream)

    return failure


async def end_open_stream(out: web.StreamResponse, api: Api, body: bytes) -> None:
    """End a stream already started with the error ``body`` as its last event, in the
    API's shape (and no end marker, so the client knows the answer is not whole); a client
    that left is no error."""
    with contextlib.suppress(ConnectionResetError):
        await out.write(api.end_event(body))
        await out.write_eof()


def _passed_headers(request: web.Request, api: Api) -> dict[str, str]:
    """The client's headers that go on to the engine for ``api``: a form's Content-Type
    (its boundary), Anthropic's version headers; never a key (the gateway sends its own)."""
    # Spelled as the gateway's own headers are: a form's Content-Type replaces its JSON one.
    names = (*api.headers, "Content-Type") if api.multipart else api.headers
    passed = {}
    for name in names:
        value = request.headers.get(name)
        # A value goes into the engine's request line by line: no line breaks in it.
        if value is not None and value.isprintable() and value.isascii():
            passed[name] = value
    return passed


def _observe_timing(metrics: Metrics, info: RequestInfo, exchange: Exchange, model: str) -> None:
    """Queue time, time to first token and the gateway's own share, once per request."""
    sent, upstream_first = exchange.sent_at, exchange.upstream_first_at
    client_first = exchange.client_first_at
    if sent is None:
        return
    queue_s = sent - info.started
    metrics.queue.observe(model, queue_s)
    if client_first is None:
        return
    metrics.time_to_first_token.observe(model, client_first - info.started)
    if upstream_first is not None:
        metrics.overhead.observe(model, queue_s + max(0.0, client_first - upstream_first))
