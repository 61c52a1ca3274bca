"""The composition root: ``create_app(config)`` wires settings, state, middleware and routes.

Nothing here does I/O when imported or when the app is created; the first snapshot is
loaded, and the upstream ``ClientSession`` opened, when the app starts (``cleanup_ctx``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timezone

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admission import Admission
from gateway.anthropic import API_KEY_HEADER, anthropic_response, is_anthropic
from gateway.balancer import Balancer
from gateway.config import GatewayConfig
from gateway.connections import Connections
from gateway.errors import error_middleware, openai_error
from gateway.health import health_context
from gateway.inflight import Inflight
from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import (
    CONTENT_TYPE,
    Metrics,
    render_connections,
    render_phases,
    render_probes,
)
from gateway.modellist import visible_models
from gateway.ondemand.controller import OnDemandController
from gateway.ondemand.wait import ON_DEMAND, on_demand_context
from gateway.openapi import document
from gateway.proxy.apis import APIS
from gateway.proxy.handler import proxy_for
from gateway.proxy.pool import UPSTREAMS, Pool
from gateway.proxy.usage import USAGE_SENDERS, UsageSenders
from gateway.ratelimit import Limiter
from gateway.redislimits import SHARED_LIMITS, SharedLimits, shared_limits_context
from gateway.reload import CleanupContext, reload_context
from gateway.responses import RESPONSE_HOMES, ResponseHomes
from gateway.state import (
    ADMISSION,
    BALANCER,
    CLIENT,
    CONFIG,
    CONNECTIONS,
    INFLIGHT,
    LIMITER,
    LIVE,
    METRICS,
    RATELIMIT_HEADERS,
    REQUEST_INFO,
    RequestInfo,
)
from hpc.backends import Backend
from hpc.catalog import Catalog
from hpc.openai import INVALID_REQUEST
from hpc.registry import Record

access_log = logging.getLogger(f"{LOGGER_NAME}.access")

REQUEST_ID_HEADER = "X-Request-Id"
# Which model answered: the one asked for, the model an alias stands for, or a fallback.
SERVED_MODEL_HEADER = "x-mt-served-model"
# A caller's request id is echoed and logged, so only a short, plain one is taken.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_BEARER = "bearer "
_PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json"})
# nginx's convention for "the client closed the connection before the answer was done".
_CLIENT_CLOSED = 499


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id and write its one access-log line, however it ends."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    info = RequestInfo(request_id=given if _REQUEST_ID.match(given) else uuid.uuid4().hex)
    request[REQUEST_INFO] = info
    metrics = request.app[METRICS]
    metrics.in_flight += 1
    status = _CLIENT_CLOSED
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        if status == _CLIENT_CLOSED and info.delivered:
            status = 200  # the client had its whole answer, then closed (Codex does)
        metrics.in_flight -= 1
        duration_s = time.monotonic() - info.started
        metrics.finished(info.model if info.routed and info.model else "-", status, duration_s)
        access_log.info(
            "request",
            extra=fields(
                request_id=info.request_id,
                method=request.method,
                path=request.path,
                model=info.model,
                served_model=info.served_model,
                status=status,
                upstream=info.upstream,
                client=info.client,
                outcome=info.outcome,
                prompt_tokens=info.prompt_tokens,
                completion_tokens=info.completion_tokens,
                tokens_estimated=info.tokens_estimated or None,
                output_limit=info.output_limit,
                duration_ms=round(duration_s * 1000, 1),
            ),
        )


async def _echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs for every response, streams included, before headers go out.
    info = request.get(REQUEST_INFO)
    if info is not None:
        response.headers[REQUEST_ID_HEADER] = info.request_id
        if info.served_model is not None:
            response.headers[SERVED_MODEL_HEADER] = info.served_model
    ratelimit = request.get(RATELIMIT_HEADERS)
    if ratelimit:
        response.headers.update(ratelimit)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a keys file, every request but ``/healthz`` and ``/openapi.json`` needs a key:
    ``Authorization: Bearer <key>``, or ``x-api-key: <key>`` (Anthropic's clients), alike.

    Deny by default: an allow-list of public paths cannot be dodged by spelling a
    ``/v1/*`` path another way.
    """
    keys = request.app[LIVE].snapshot.keys
    if keys is None or request.path in _PUBLIC_PATHS:
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if header.lower().startswith(_BEARER):
        token = header[len(_BEARER) :].strip()
    else:
        token = request.headers.get(API_KEY_HEADER, "").strip()
    client = keys.find(token) if token else None
    if client is None or (
        client.entry.expires_at is not None and client.entry.expired(datetime.now(timezone.utc))
    ):
        if client is not None:
            message = "API key expired"
        elif token:
            message = "invalid API key"
        else:
            message = "missing API key (Authorization: Bearer <key>, or x-api-key: <key>)"
        refused = openai_error(
            401,
            message,
            INVALID_REQUEST,
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        return anthropic_response(refused) if is_anthropic(request.path) else refused
    info = request[REQUEST_INFO]
    info.client = client.name
    request[CLIENT] = client
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: alive, how many model names it routes, and per name its replicas.

    ``ready`` counts the replicas the balancer would use now (not ejected by health probes,
    not skipped for failures) out of ``total`` routed.
    """
    routes = request.app[LIVE].snapshot.routes
    balancer = request.app[BALANCER]
    replicas = {}
    for name in routes.names():
        upstreams = routes.upstreams(name)
        ready = sum(1 for u in upstreams if balancer.usable(u.source))
        replicas[name] = {"ready": ready, "total": len(upstreams)}
    return web.json_response({"status": "ok", "models": len(replicas), "replicas": replicas})


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: every name the key may use (``gateway.modellist``), in OpenAI's list
    shape with an ``mt`` field each: ready, in a swap pool, or started on request."""
    data = [row.openai() for row in visible_models(request)]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (the openai client's ``models.retrieve``): one entry of the list
    (so the key's allow-list holds here too), or 404 ``model_not_found``; a name may hold
    slashes (``org/model``)."""
    wanted = request.match_info["id"]
    for row in visible_models(request):
        entry = row.openai()
        if entry["id"] == wanted:
            return web.json_response(entry)
    return openai_error(
        404,
        f"model {wanted[:200]!r} is not served here; GET /v1/models lists the names that are",
        INVALID_REQUEST,
        "model_not_found",
        param="model",
    )


def _serving_records(served: Catalog) -> list[Record]:
    """The records of the jobs that serve a routable name (each once)."""
    found = {
        endpoint.record.key: endpoint.record
        for endpoints in served.routable().values()
        for endpoint in endpoints
        if endpoint.record is not None
    }
    return list(found.values())


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format (behind the key like every path but /healthz)."""
    balancer = request.app[BALANCER]
    text = (
        request.app[METRICS].render(balancer.snapshot())
        + render_probes(balancer.probes())
        + render_connections(request.app[CONNECTIONS])
        + render_phases(_serving_records(request.app[LIVE].snapshot.routes.catalog))
    )
    if (shared := request.app.get(SHARED_LIMITS)) is not None:
        text += shared.render()
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})


def _upstreams_context(config: GatewayConfig) -> CleanupContext:
    async def context(app: web.Application) -> AsyncIterator[None]:
        # Only connecting has a limit of the pool's; the proxy keeps its own clocks for the
        # first byte and for the silence between chunks, and no total limit: a long,
        # healthy stream must never be cut. No limit on connections either (see pool.py).
        pool = Pool(connect_timeout_s=config.connect_timeout_s)
        app[UPSTREAMS] = pool
        try:
            yield
        finally:
            pool.close()

    return context


def create_app(
    config: GatewayConfig,
    *,
    env: Mapping[str, str] | None = None,
    backend: Backend | None = None,
) -> web.Application:
    """The gateway app; ``env`` supplies static backends' keys (default: ``os.environ``);
    ``backend`` starts on-demand models' jobs (without one, they are routed like others)."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[request_middleware, error_middleware, auth_middleware],
    )
    app[CONFIG] = config
    limiter = app[LIMITER] = Limiter()
    app[METRICS] = Metrics()
    app[USAGE_SENDERS] = UsageSenders()
    balancer = app[BALANCER] = Balancer(eject_after=config.health_failures_to_eject)
    admission = app[ADMISSION] = Admission(config.max_in_flight, config.max_in_flight_per_model)
    if config.redis_url is not None:
        # The limits of every replica, in Redis; these two are the fallback while it is down.
        shared = app[SHARED_LIMITS] = SharedLimits(
            config.redis_url.get_secret_value(),
            config.redis_prefix,
            limiter,
            admission,
            config.max_in_flight,
            config.max_in_flight_per_model,
        )
        app.cleanup_ctx.append(shared_limits_context(shared))
    app[INFLIGHT] = Inflight()
    app[RESPONSE_HOMES] = ResponseHomes()
    # Counted by the connections' own handlers (protocol.py) when served by ``server.start``.
    app[CONNECTIONS] = Connections(
        config.max_connections, config.max_connections_per_client or None
    )
    # Reload first: if the config is bad, startup fails before the upstream pool is made.
    app.cleanup_ctx.append(reload_context(config, os.environ if env is None else env, LIVE))
    app[ON_DEMAND] = OnDemandController(
        config,
        backend,
        lambda: app[LIVE].snapshot.models,
        # Requests in flight to a replica: which of a model's jobs is busy.
        lambda source: balancer.snapshot().get(source, (0, False))[0],
    )
    app.cleanup_ctx.append(on_demand_context(ON_DEMAND))
    app.cleanup_ctx.append(_upstreams_context(config))
    app.cleanup_ctx.append(health_context(config, BALANCER, LIVE))
    app.on_response_prepare.append(_echo_request_id)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{id:.+}", retrieve_model)
    app.router.add_get("/metrics", metrics)
    openapi = json.dumps(document()).encode("utf-8")

    async def openapi_json(_request: web.Request) -> web.Response:
        """GET /openapi.json: the static OpenAPI document (needs no key)."""
        return web.Response(body=openapi, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    for api in APIS:
        app.router.add_post(api.path, proxy_for(api))
    return app
