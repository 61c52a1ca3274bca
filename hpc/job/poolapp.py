"""The swap pool's HTTP app: OpenAI's routes for every model of the catalogue, behind the
job's key; a request for a model not loaded waits for its load (hpc.job.slots), a stream
gets SSE comments meanwhile. hpc.job.swappool serves it (as the job's front under Slurm and
locally, as plain HTTP in a Kubernetes pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from hpc.errors import MTError
from hpc.job import poolmetrics
from hpc.job.slots import Slot, Slots
from hpc.openai import (
    INVALID_REQUEST,
    PROXIED_PATHS,
    SERVER_ERROR,
    SSE_HEADERS,
    error_body,
    error_event,
    error_object,
    http_error,
    kept_headers,
)

log = logging.getLogger("mt.swappool")

_HOP_HEADERS = ("Content-Type", "Cache-Control")

SLOTS = web.AppKey("slots", Slots)
KEY = web.AppKey("key", str)
OPEN_HEALTH = web.AppKey("open_health", bool)


def openai_error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error response in OpenAI's shape."""
    body = error_object(message, type_, code, param)
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404, 405, 413) and escaped exceptions (500, logged) in
    OpenAI's shape, as the gateway answers them."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message, type_, code = http_error(
            exc.status, request.method, request.path, exc.reason, request.client_max_size
        )
        headers = kept_headers(exc.headers)
        return openai_error(exc.status, message, type_, code, headers=headers)
    except Exception as exc:
        # The pool's one boundary where an unexpected error becomes a 500; the traceback
        # goes to the job's log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return openai_error(
            500, f"internal gateway error ({type(exc).__name__})", SERVER_ERROR, "internal_error"
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every path needs ``Authorization: Bearer <the job's key>``, ``/health`` too (except
    in a Kubernetes pod, where the kubelet probes it: it says only "ok", like the engines')."""
    if request.path == "/health" and request.app[OPEN_HEALTH]:
        return await handler(request)
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {request.app[KEY]}".encode()):
        return openai_error(
            401, "this swap pool needs its job's key", INVALID_REQUEST, "invalid_api_key"
        )
    return await handler(request)


async def _proxy(request: web.Request) -> web.StreamResponse:
    """Forward one OpenAI request to the engine of its model, loading that model if needed."""
    slots = request.app[SLOTS]
    body = await request.read()
    try:
        payload = json.loads(body)
    except ValueError:
        return openai_error(400, "request body is not JSON", INVALID_REQUEST, "invalid_json")
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or model not in slots.specs:
        names = ", ".join(slots.specs)
        return openai_error(
            404,
            f"model {model!r} is not in this pool's catalogue ({names})",
            INVALID_REQUEST,
            "model_not_found",
            param="model",
        )
    stream = isinstance(payload, dict) and payload.get("stream") is True
    if stream and slots.serving(model) is None:
        return await _stream_cold(request, slots, model, body)
    try:
        slot = await slots.acquire(model)
    except MTError as exc:
        return openai_error(
            503, exc.message, SERVER_ERROR, "model_load_failed", headers={"Retry-After": "5"}
        )
    try:
        return await _relay(request, slots, slot, body, None)
    finally:
        slots.release(slot)


async def _stream_cold(
    request: web.Request, slots: Slots, model: str, body: bytes
) -> web.StreamResponse:
    """A stream for a model that is not loaded: 200 at once, comments while it loads.

    The client (and the gateway's time-to-first-token clock) gets its first bytes now
    instead of after the load; SSE clients ignore comment lines. The engine's stream then
    follows in the same response. A load failure can no longer change the status, so it
    becomes an in-band error event, with no ``[DONE]``.
    """
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await out.prepare(request)
    acquiring = asyncio.ensure_future(slots.acquire(model))
    try:
        slot = await _keep_alive(out, slots, model, acquiring)
    except MTError as exc:
        await _end_with_error(out, exc.message, "model_load_failed")
        return out
    except BaseException as exc:  # the client left (or the handler is cancelled)
        # Stop waiting; the load itself goes on for the others (acquire shields it).
        done = not acquiring.cancel() and not acquiring.cancelled()
        if done and acquiring.exception() is None:
            slots.release(acquiring.result())  # it was done: its slot was counted in
        if isinstance(exc, ConnectionError):
            return out
        raise
    try:
        return await _relay(request, slots, slot, body, out)
    except ConnectionError:  # the client left mid-stream: closing the engine's request
        return out  # (leaving the ``async with``) is what stops its generation
    finally:
        slots.release(slot)


async def _keep_alive(
    out: web.StreamResponse, slots: Slots, model: str, acquiring: asyncio.Future[Slot]
) -> Slot:
    """Write ``: loading …`` comments every ``keepalive_s`` until ``acquiring`` is done."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _turn in range(3):  # let acquire start the load and claim an empty slot, if one is
        await asyncio.sleep(0)
    slot = slots.loading_slot(model)
    where = f"in slot {slot.index}" if slot is not None else "(waiting for a free slot)"
    await out.write(f": loading {model} {where}\n\n".encode())
    interval = slots.plan.pool.keepalive_s
    while True:
        done, _pending = await asyncio.wait({acquiring}, timeout=interval)
        if done:
            return acquiring.result()
        await out.write(f": loading {model} ({loop.time() - started:.0f}s)\n\n".encode())


async def _end_with_error(out: web.StreamResponse, message: str, code: str) -> None:
    """An in-band error event ends a stream whose 200 is already out (no [DONE])."""
    with contextlib.suppress(ConnectionError):
        await out.write(error_event(error_body(message, SERVER_ERROR, code)))
        await out.write_eof()


async def _relay(
    request: web.Request,
    slots: Slots,
    slot: Slot,
    body: bytes,
    out: web.StreamResponse | None,
) -> web.StreamResponse:
    """Forward to ``slot``'s engine and relay its answer chunk by chunk; into ``out`` if it
    is given (a stream whose 200 already went out while the model loaded)."""
    model, cold = slot.model, out is not None
    headers = {"Authorization": f"Bearer {slot.key}", "Content-Type": "application/json"}
    try:
        # The query goes on too: the Anthropic SDK's ``?beta=true`` on /v1/messages.
        url = slot.url(request.path_qs)
        async with slot.client().post(url, data=body, headers=headers) as up:
            if out is not None and up.status != 200:
                answer = await up.read()
                message = f"{model}'s engine answered {up.status}: {answer[:500]!r}"
                await _end_with_error(out, message, "upstream_error")
                return out
            if out is None:
                out = web.StreamResponse(
                    status=up.status,
                    headers={h: up.headers[h] for h in _HOP_HEADERS if h in up.headers},
                )
                await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
    except aiohttp.ClientError as exc:
        if out is None:
            return openai_error(
                502, f"{model}'s engine failed: {exc}", SERVER_ERROR, "upstream_error"
            )
        if not cold:
            raise  # bytes already went out: the client sees the stream end early
        # The 200 went out before the engine was asked: the error goes in-band, no [DONE].
        await _end_with_error(out, f"{model}'s engine failed: {exc}", "upstream_error")
        return out


async def _status(request: web.Request) -> web.Response:
    """GET /pool/status: every slot and the catalogue."""
    return web.json_response(request.app[SLOTS].status())


async def _models(request: web.Request) -> web.Response:
    """GET /v1/models: the catalogue (every name can be asked for, loaded or not)."""
    data = [{"id": name, "object": "model", "owned_by": "mt"} for name in request.app[SLOTS].specs]
    return web.json_response({"object": "list", "data": data})


async def _metrics(request: web.Request) -> web.Response:
    """GET /metrics: the pool's own metrics (hpc.job.poolmetrics), for Prometheus."""
    text = poolmetrics.render(request.app[SLOTS])
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(slots: Slots, key: str, *, open_health: bool = False) -> web.Application:
    """The pool's aiohttp app around ``slots``, requiring ``key`` (on ``/health`` too unless
    ``open_health``)."""
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[SLOTS] = slots
    app[KEY] = key
    app[OPEN_HEALTH] = open_health
    for path in PROXIED_PATHS:
        app.router.add_post(path, _proxy)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/pool/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    return app
