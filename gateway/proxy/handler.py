"""The hot path's entry: parse, authorise, plan, find replicas, forward, respond.

The body is read once (``client_max_size`` caps it), parsed once for ``model`` and
``stream``, and the original bytes go upstream. The plan is the model, then its fallbacks
(those the key may use); each is tried only when every replica of the one before failed
with nothing sent to the client yet (least outstanding requests first, see ``balancer``;
what counts as failed is ``failures``). An on-demand model is waited for first
(``gateway.ondemand.wait``); the handler then carries on with the replicas it is given.
Admission control (``admission``) is checked before any upstream is tried.

One handler per model-routed route (:func:`proxy_for`): what differs between them (where
the engine serves the path, how a stream ends, the error shape, a form body) is the route's
``apis.Api``, read as attributes, so chat completions pay nothing for the other APIs. A
Responses follow-up (``previous_response_id``) goes to the replica that holds the response
(``gateway.responses``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.anthropic import anthropic_response
from gateway.errors import openai_error
from gateway.keys import Client
from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import Metrics
from gateway.ondemand.jobs import Asker
from gateway.ondemand.wait import ON_DEMAND, Ready, end_stream, ready
from gateway.proxy.apis import Api
from gateway.proxy.body import read_body
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
from gateway.proxy.usage import charge, with_usage
from gateway.ratelimit import KeyBuckets
from gateway.responses import RESPONSE_HOMES, Home, response_id
from gateway.routes import Upstream
from gateway.state import (
    ADMISSION,
    BALANCER,
    CLIENT,
    CONFIG,
    INFLIGHT,
    LIMITER,
    LIVE,
    METRICS,
    RATELIMIT_HEADERS,
    REQUEST_INFO,
    RequestInfo,
)
from hpc.openai import INVALID_REQUEST

log = logging.getLogger(f"{LOGGER_NAME}.proxy")
# The in-band error of a stream whose answer was no plain response (not reached today).
_NO_ANSWER = b'{"error": {"message": "no answer"}}'


def proxy_for(api: Api) -> Handler:
    """The handler of one model-routed route (``apis``): parse, authorise, plan, forward."""
    if api.anthropic:

        async def anthropic(request: web.Request) -> web.StreamResponse:
            response = await _proxy(request, api)
            if isinstance(response, web.Response) and response.status >= 400:
                return anthropic_response(response)
            return response

        return anthropic

    async def proxy(request: web.Request) -> web.StreamResponse:
        return await _proxy(request, api)

    return proxy


async def _proxy(request: web.Request, api: Api) -> web.StreamResponse:
    """POST to a model-routed route: /v1/chat/completions, /v1/responses, /tokenize, …"""
    info = request[REQUEST_INFO]
    config = request.app[CONFIG]
    read = await read_body(request, config, request.app[ADMISSION], form=api.multipart)
    if isinstance(read, web.Response):
        return read
    body, payload, model = read.raw, read.payload, read.model
    info.model = model[:200]
    exchange = Exchange(payload, api, read.form)
    stream = payload.get("stream") is True

    routes = request.app[LIVE].snapshot.routes
    canonical = routes.resolve(model)
    client = request.get(CLIENT)
    if client is not None and not (client.allows(model) or client.allows(canonical)):
        return openai_error(
            403,
            f"this key may not use model {model[:200]!r}",
            INVALID_REQUEST,
            "model_not_allowed",
            param="model",
        )
    pinned: Upstream | None = None
    if api.sticky:
        found = _pinned(request, payload, canonical, client)
        if isinstance(found, web.Response):
            return found
        pinned = found
    if client is not None:
        exchange.buckets, limited = _rate_limit(request, client, info)
        if limited is not None:
            return limited

    if request.app[ON_DEMAND].manages(canonical):
        info.routed = True
        response = await _on_demand(request, info, exchange, body, stream, canonical, pinned)
        return response
    # The model itself, then its fallbacks (those the key may use), each tried only when
    # every replica of the one before failed with nothing sent to the client yet. A
    # follow-up of a stored response goes to the replica that holds it, and nowhere else.
    plan = [canonical]
    if pinned is None:
        plan += [f for f in routes.fallbacks(canonical) if client is None or client.allows(f)]
    if not any(routes.upstreams(served) for served in plan):
        info.routed = routes.is_known(model)
        return no_route(routes, model[:200], canonical, config.retry_after_s)
    info.routed = True
    candidates = (pinned,) if pinned is not None else None
    response, used = await _proceed(request, exchange, body, stream, info, plan, candidates)
    if api.sticky and used is not None:
        _remember(request, response, exchange, stream, used, client)
    return response


def _pinned(
    request: web.Request, payload: dict[str, Any], model: str, client: Client | None
) -> Upstream | web.Response | None:
    """The replica that holds the ``previous_response_id`` a follow-up names: None if the
    gateway does not know the id (routed like any request), or the 400 that refuses it."""
    previous = payload.get("previous_response_id")
    if not isinstance(previous, str):
        return None
    home = request.app[RESPONSE_HOMES].find(previous)
    if home is None:
        return None
    owner = client.name if client is not None else None
    if home.client == owner:
        for upstream in request.app[LIVE].snapshot.routes.upstreams(model):
            if upstream.source == home.source:
                return upstream
        reason = "the replica that holds it no longer serves this model"
    else:
        reason = "it was not made with this key"
    return openai_error(
        400,
        f"previous response {previous[:200]!r} cannot be continued here: {reason}; "
        "start a new conversation (send the whole input)",
        INVALID_REQUEST,
        "previous_response_not_found",
        param="previous_response_id",
    )


def _remember(
    request: web.Request,
    response: web.StreamResponse,
    exchange: Exchange,
    stream: bool,
    source: str,
    client: Client | None,
) -> None:
    """Note which replica holds the response just relayed (its id from the answer)."""
    if stream:
        data = exchange.first
    elif isinstance(response, web.Response) and response.status == 200:
        data = response.body if isinstance(response.body, bytes) else None
    else:
        data = None
    found = response_id(data, stream=stream) if data else None
    if found is not None:
        home = Home(source, client.name if client is not None else None)
        request.app[RESPONSE_HOMES].remember(found, home)


async def _on_demand(
    request: web.Request,
    info: RequestInfo,
    exchange: Exchange,
    body: bytes,
    stream: bool,
    model: str,
    pinned: Upstream | None,
) -> web.StreamResponse:
    """Wait for the on-demand model's replicas (its job may have to start first), then
    forward to them (only ``pinned``, if it is one: it holds the previous response); the
    controller counts the request in flight until it is answered."""
    controller = request.app[ON_DEMAND]
    client = request.get(CLIENT)
    asker = Asker(
        info.request_id,
        client.name if client is not None else None,
        client.entry.max_on_demand_jobs if client is not None else None,
    )
    state = controller.enter(model, asker)
    used: str | None = None
    try:
        candidates = request.app[LIVE].snapshot.routes.pick(model)
        waited = await ready(request, controller, state, asker, candidates, stream, info)
        if not isinstance(waited, Ready):
            return waited  # refused (or the client left while it waited)
        exchange.out = waited.out
        replicas = (pinned,) if pinned in waited.replicas else waited.replicas
        response, used = await _proceed(request, exchange, body, stream, info, [model], replicas)
        if exchange.api.sticky and used is not None:
            _remember(request, response, exchange, stream, used, client)
        if waited.out is not None and response is not waited.out:
            # No replica answered, and the wait's keep-alives have committed the 200.
            error = response.body if isinstance(response, web.Response) else None
            await end_stream(waited.out, error if isinstance(error, bytes) else _NO_ANSWER)
            return waited.out
        return response
    finally:
        controller.leave(state, used)


def _rate_limit(
    request: web.Request, client: Client, info: RequestInfo
) -> tuple[KeyBuckets | None, web.Response | None]:
    """The client's buckets (None without limits), and a 429 if they are empty (else one
    request is taken)."""
    entry = client.entry
    buckets = request.app[LIMITER].buckets(
        client.name, entry.requests_per_min, entry.tokens_per_min
    )
    if buckets is None:
        return None, None
    verdict = buckets.admit()
    request[RATELIMIT_HEADERS] = verdict.headers
    if verdict.allowed:
        return buckets, None
    per_min = "requests" if verdict.limited == "requests" else "tokens"
    return buckets, openai_error(
        429,
        f"rate limit reached: {per_min} per minute for key {client.name!r}; "
        f"retry in {verdict.retry_after_s} s",
        INVALID_REQUEST,
        f"rate_limit_{per_min}",
        headers={"Retry-After": str(verdict.retry_after_s)},
    )


async def _proceed(
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
        body, strip_usage = with_usage(payload, body)

    admission = request.app[ADMISSION]
    full = admission.enter(canonical)
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
            await end_stream(exchange.out, refusal.body if isinstance(refusal.body, bytes) else b"")
            return exchange.out, None
        return refusal, None
    finally:
        admission.leave(canonical)
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
    headers = _passed_headers(request, api)
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


def _passed_headers(request: web.Request, api: Api) -> dict[str, str] | None:
    """The client's headers that go on to the engine for ``api``: a form's Content-Type
    (its boundary), Anthropic's version headers; never a key (the gateway sends its own)."""
    if not api.headers and not api.multipart:
        return None
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
