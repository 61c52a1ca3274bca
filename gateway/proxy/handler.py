"""The hot path's entry: parse, authorise, plan, find replicas, forward, respond.

The body is read once (``client_max_size`` caps it), parsed once for ``model`` and
``stream``, and the original bytes go upstream. The plan is the model, then its fallbacks
(those the key may use); each is tried only when every replica of the one before failed
with nothing sent to the client yet (least outstanding requests first, see ``balancer``;
what counts as failed is ``failures``). An on-demand model is waited for first
(``gateway.ondemand.wait``); the handler then carries on with the replicas it is given.
Admission control (``admission``) is checked before any upstream is tried.

The forwarding itself (admission, the replicas in turn) is ``forward``'s. One handler per
model-routed route (:func:`proxy_for`): what differs between them (where
the engine serves the path, how a stream ends, the error shape, a form body) is the route's
``apis.Api``, read as attributes, so chat completions pay nothing for the other APIs. A
Responses follow-up (``previous_response_id``) goes to the replica that holds the response
(``sticky``).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.anthropic import anthropic_response
from gateway.errors import openai_error
from gateway.keys import Client
from gateway.ondemand.jobs import Asker
from gateway.ondemand.wait import ON_DEMAND, Ready, ready
from gateway.proxy.apis import Api
from gateway.proxy.body import read_body
from gateway.proxy.exchange import Exchange
from gateway.proxy.failures import no_route
from gateway.proxy.forward import end_open_stream, proceed
from gateway.proxy.outputlimit import limited_body
from gateway.proxy.sticky import pinned_replica, remember
from gateway.ratelimit import KeyBuckets, Spender, Verdict
from gateway.redislimits import SHARED_LIMITS, SharedLimits
from gateway.routes import Upstream
from gateway.state import (
    ADMISSION,
    CLIENT,
    CONFIG,
    LIMITER,
    LIVE,
    RATELIMIT_HEADERS,
    REQUEST_INFO,
    RequestInfo,
)
from hpc.openai import INVALID_REQUEST

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
        found = pinned_replica(request, payload, canonical, client)
        if isinstance(found, web.Response):
            return found
        pinned = found
    if client is not None:
        shared = request.app.get(SHARED_LIMITS)
        if shared is None:
            exchange.buckets, limited = _rate_limit(request, client)
        else:
            exchange.buckets, limited = await _shared_rate_limit(request, client, shared)
        if limited is not None:
            return limited
    body, info.output_limit = limited_body(request.path, payload, body, routes.limits(canonical))

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
    response, used = await proceed(request, exchange, body, stream, info, plan, candidates)
    if api.sticky and used is not None:
        remember(request, response, exchange, stream, used, client)
    return response


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
        response, used = await proceed(request, exchange, body, stream, info, [model], replicas)
        if exchange.api.sticky and used is not None:
            remember(request, response, exchange, stream, used, client)
        if waited.out is not None and response is not waited.out:
            # No replica answered, and the wait's keep-alives have committed the 200.
            error = response.body if isinstance(response, web.Response) else None
            body = error if isinstance(error, bytes) else _NO_ANSWER
            await end_open_stream(waited.out, exchange.api, body)
            return waited.out
        return response
    finally:
        controller.leave(state, used)


def _rate_limit(
    request: web.Request, client: Client
) -> tuple[KeyBuckets | None, web.Response | None]:
    """The client's buckets (None without limits), and a 429 if they are empty (else one
    request is taken)."""
    entry = client.entry
    buckets = request.app[LIMITER].buckets(
        client.name, entry.requests_per_min, entry.tokens_per_min
    )
    if buckets is None:
        return None, None
    return buckets, _refusal(request, client, buckets.admit())


async def _shared_rate_limit(
    request: web.Request, client: Client, shared: SharedLimits
) -> tuple[Spender | None, web.Response | None]:
    """``_rate_limit`` with the buckets every gateway replica shares (``redislimits``)."""
    entry = client.entry
    found = await shared.admit(client.name, entry.requests_per_min, entry.tokens_per_min)
    if found is None:
        return None, None
    verdict, buckets = found
    return buckets, _refusal(request, client, verdict)


def _refusal(request: web.Request, client: Client, verdict: Verdict) -> web.Response | None:
    """The 429 of a refused ``verdict`` (None if allowed); its headers go on either answer."""
    request[RATELIMIT_HEADERS] = verdict.headers
    if verdict.allowed:
        return None
    per_min = "requests" if verdict.limited == "requests" else "tokens"
    return openai_error(
        429,
        f"rate limit reached: {per_min} per minute for key {client.name!r}; "
        f"retry in {verdict.retry_after_s} s",
        INVALID_REQUEST,
        f"rate_limit_{per_min}",
        headers={"Retry-After": str(verdict.retry_after_s)},
    )
