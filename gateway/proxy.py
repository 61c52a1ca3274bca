"""The hot path: forward an OpenAI request to an upstream that serves its model.

The body is read once (``client_max_size`` caps it), parsed once for ``model`` and
``stream``, and the original bytes go upstream with the upstream's own key; the client's
key never leaves the gateway. A connection failure before any byte reached the client moves
on to the next replica. A stream is relayed chunk by chunk as it arrives: no buffering, no
per-chunk parsing; only the last few bytes are kept, to see whether ``data: [DONE]`` came.
A stream that breaks, or ends without ``[DONE]``, gets an in-band ``data: {"error": …}``
event and no ``[DONE]``, so a client can tell a cut answer from a whole one.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web

from gateway.errors import INVALID_REQUEST, SERVER_ERROR, error_body, openai_error
from gateway.logs import LOGGER_NAME, fields
from gateway.routes import RouteTable, Upstream
from gateway.state import CONFIG, LIVE, REQUEST_INFO, SESSION, RequestInfo

log = logging.getLogger(f"{LOGGER_NAME}.proxy")

API_PREFIX = "/v1"
PROXIED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

_DONE = b"data: [DONE]"
_TAIL_BYTES = 32
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _no_route(routes: RouteTable, model: str, retry_after_s: int) -> web.Response:
    if not routes.is_known(model):
        return openai_error(
            404,
            f"model {model!r} is not served here; GET /v1/models lists the names that are",
            INVALID_REQUEST,
            "model_not_found",
            param="model",
        )
    if routes.is_starting(model):
        hint = "a job for it is starting; retry shortly"
    else:
        hint = f"hint: mt submit {model}"
    return openai_error(
        503,
        f"model {model!r} is configured but has no ready endpoint ({hint})",
        SERVER_ERROR,
        "no_ready_endpoint",
        param="model",
        headers={"Retry-After": str(retry_after_s)},
    )


def _upstream_headers(upstream: Upstream, request_id: str) -> dict[str, str]:
    headers = {
        # The body parsed as JSON, whatever the client labelled it (curl -d says form data).
        "Content-Type": "application/json",
        # Uncompressed: the bytes are relayed as they come, and the links are local.
        "Accept-Encoding": "identity",
        "X-Request-Id": request_id,
    }
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    return headers


async def proxy(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
    info = request[REQUEST_INFO]
    body = await request.read()
    try:
        payload = json.loads(body)
    except ValueError:
        return openai_error(400, "request body is not valid JSON", INVALID_REQUEST, "invalid_json")
    if not isinstance(payload, dict):
        return openai_error(
            400, "request body must be a JSON object", INVALID_REQUEST, "invalid_body"
        )
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(
            400,
            "request body needs a 'model' (a name from GET /v1/models)",
            INVALID_REQUEST,
            "missing_model",
            param="model",
        )
    info.model = model[:200]
    stream = payload.get("stream") is True

    config = request.app[CONFIG]
    routes = request.app[LIVE].snapshot.routes
    candidates = routes.pick(model)
    if not candidates:
        return _no_route(routes, model[:200], config.retry_after_s)

    session = request.app[SESSION]
    suffix = request.path[len(API_PREFIX) :]
    for upstream in candidates:
        info.upstream = upstream.source
        try:
            response = await _send(session, upstream, suffix, body, info.request_id)
        except aiohttp.SocketTimeoutError:
            return _timeout_error(upstream, config.idle_timeout_s)
        except aiohttp.ClientError as exc:
            return _bad_upstream(upstream, f"{type(exc).__name__}: {exc}")
        if response is None:
            continue
        try:
            return await _relay(request, response, upstream, stream, info)
        finally:
            # A response read to its end goes back to the pool; anything else (a cut
            # stream, a client that left, a cancelled handler) closes the connection, which
            # is what tells the engine to stop generating.
            if response.content.at_eof():
                response.release()
            else:
                response.close()

    info.upstream = None
    return openai_error(
        503,
        f"no upstream for model {model[:200]!r} could be reached ({len(candidates)} tried)",
        SERVER_ERROR,
        "upstream_unavailable",
        headers={"Retry-After": str(config.retry_after_s)},
    )


async def _send(
    session: aiohttp.ClientSession, upstream: Upstream, suffix: str, body: bytes, request_id: str
) -> aiohttp.ClientResponse | None:
    """The upstream's response (headers read), or None if it cannot be reached."""
    headers = _upstream_headers(upstream, request_id)
    error: aiohttp.ClientError | None = None
    for _ in range(2):
        try:
            return await session.post(upstream.url(suffix), data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            error = exc
            break
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # Perhaps a pooled keep-alive connection the engine closed just as it was
            # reused: one more try, on a fresh connection, before the next replica.
            error = exc
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
    return None


def _timeout_error(upstream: Upstream, idle_timeout_s: float) -> web.Response:
    return openai_error(
        504,
        f"upstream {upstream.source} sent nothing for {idle_timeout_s:g} s",
        SERVER_ERROR,
        "upstream_timeout",
    )


def _bad_upstream(upstream: Upstream, what: str) -> web.Response:
    return openai_error(
        502, f"upstream {upstream.source} failed: {what}", SERVER_ERROR, "upstream_error"
    )


async def _relay(
    request: web.Request,
    response: aiohttp.ClientResponse,
    upstream: Upstream,
    stream: bool,
    info: RequestInfo,
) -> web.StreamResponse:
    if response.status in (401, 403):
        # The upstream refused the gateway's key, not the client's: passing the status on
        # would tell the client its own key is wrong.
        return _bad_upstream(
            upstream, f"it answered {response.status} to the gateway's key (stale record?)"
        )
    if stream and response.status == 200 and response.content_type == "text/event-stream":
        return await _relay_stream(request, response, upstream, info)
    try:
        body = await response.read()
    except aiohttp.SocketTimeoutError:
        return _timeout_error(upstream, request.app[CONFIG].idle_timeout_s)
    except aiohttp.ClientError as exc:
        return _bad_upstream(upstream, f"{type(exc).__name__}: {exc}")
    content_type = response.headers.get("Content-Type", "application/json")
    if response.status >= 400 and not _is_json_object(body):
        return _bad_upstream(upstream, f"it answered {response.status} without a JSON error")
    return web.Response(status=response.status, body=body, headers={"Content-Type": content_type})


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


async def _relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    upstream: Upstream,
    info: RequestInfo,
) -> web.StreamResponse:
    out = web.StreamResponse(status=200, headers=_SSE_HEADERS)
    await out.prepare(request)
    content = response.content
    tail = b""
    failure: tuple[str, str] | None = None
    while True:
        # readany() is what iter_any() loops over; calling it here keeps the upstream's
        # errors (reads) apart from the client's (writes).
        try:
            chunk = await content.readany()
        except (aiohttp.SocketTimeoutError, asyncio.TimeoutError):
            idle = request.app[CONFIG].idle_timeout_s
            failure = (
                f"upstream {upstream.source} sent nothing for {idle:g} s",
                "upstream_timeout",
            )
            break
        except aiohttp.ClientError as exc:
            failure = (
                f"upstream {upstream.source} broke off the stream ({type(exc).__name__})",
                "upstream_error",
            )
            break
        if not chunk:
            break
        try:
            await out.write(chunk)
        except ConnectionResetError:
            info.outcome = "client_disconnected"
            return out
        tail = (tail + chunk[-_TAIL_BYTES:])[-_TAIL_BYTES:]
    if failure is None and not tail.rstrip().endswith(_DONE):
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
            event = b"data: " + error_body(message, SERVER_ERROR, code) + b"\n\n"
            await out.write(_event_separator(tail) + event)
        await out.write_eof()
    except ConnectionResetError:
        info.outcome = "client_disconnected"
    return out


def _event_separator(tail: bytes) -> bytes:
    """What to write so the next event starts on its own, after whatever came before."""
    if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\n\n"
