"""The hot path: forward an OpenAI request to an upstream that serves its model.

The body is read once (``client_max_size`` caps it), parsed once for ``model`` and
``stream``, and the original bytes go upstream with the upstream's own key; the client's
key never leaves the gateway. Nothing reaches the client before the upstream's status and,
for a stream, its first whole event are in: until then a replica that cannot be reached,
answers 5xx, breaks, or opens its stream with an error event is passed over for the next
one (least outstanding requests first, see ``balancer``), and the client gets one error if
none answers. A stream is then relayed event by event as it arrives: no per-chunk JSON
parsing; only the last few bytes are kept, to see whether ``data: [DONE]`` came, and an
incomplete trailing event waits for its end. A stream that breaks after that, or ends
without ``[DONE]``, gets an in-band ``data: {"error": …}`` event and no ``[DONE]``, so a
client can tell a cut answer from a whole one; so does an engine's own in-band error event
(found by a bytes search for ``{"error"``).

Three clocks, each with its own 504 code: connecting (aiohttp's ``connect`` timeout), the
first event of a stream or the first byte of a plain body (``first_token_timeout_s``, from
sending), and the silence between chunks after it (``idle_timeout_s``). None is a total
timeout, and none runs while the gateway waits for a slow client. Admission control
(``admission``) is checked before any upstream is tried.

Token usage: a stream is sent upstream with ``stream_options.include_usage`` forced on (the
body is re-serialized for that); the one event carrying ``"usage": {…}`` (found with a
bytes search, then parsed alone) is counted, and dropped again if the client did not ask for
it. A JSON answer's ``usage`` is found from its end and parsed alone too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import INVALID_REQUEST, SERVER_ERROR, error_body, openai_error
from gateway.inflight import ShuttingDown
from gateway.keys import Client
from gateway.logs import LOGGER_NAME, fields
from gateway.metrics import Gaps, Metrics
from gateway.ondemand import ON_DEMAND
from gateway.routes import RouteTable, Upstream
from gateway.state import (
    ADMISSION,
    BALANCER,
    CONFIG,
    INFLIGHT,
    LIMITER,
    LIVE,
    METRICS,
    REQUEST_INFO,
    SESSION,
    RequestInfo,
)

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # aiohttp itself depends on async-timeout before Python 3.11
    from async_timeout import timeout_at  # type: ignore[import-not-found,unused-ignore]

log = logging.getLogger(f"{LOGGER_NAME}.proxy")

API_PREFIX = "/v1"
PROXIED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")

_DONE = b"data: [DONE]"
_TAIL_BYTES = 32
# An event that waits for its end is sent anyway past this size (bounded memory).
_MAX_CARRY_BYTES = 64 * 1024
# A "usage" key with an object value; a string "usage" in content cannot be followed by ":{".
_USAGE_MARKS = (b'"usage":{', b'"usage": {')
# An engine's in-band error event starts with this after "data: " (vLLM, llama.cpp).
_ERROR_KEY = b'{"error"'
_decoder = json.JSONDecoder()
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _no_route(routes: RouteTable, model: str, canonical: str, retry_after_s: int) -> web.Response:
    if not routes.is_known(model):
        return openai_error(
            404,
            f"model {model!r} is not served here; GET /v1/models lists the names that are",
            INVALID_REQUEST,
            "model_not_found",
            param="model",
        )
    if routes.is_starting(canonical):
        hint = "a job for it is starting; retry shortly"
    else:
        hint = f"hint: mt submit {routes.submit_name(canonical)}"
    return openai_error(
        503,
        f"model {model!r} is configured but has no ready endpoint ({hint})",
        SERVER_ERROR,
        "no_ready_endpoint",
        param="model",
        headers={"Retry-After": str(retry_after_s)},
    )


def _rate_limit(request: web.Request, client: Client, info: RequestInfo) -> web.Response | None:
    """A 429 if the client's buckets are empty, else None (and one request taken)."""
    entry = client.entry
    buckets = request.app[LIMITER].buckets(
        client.name, entry.requests_per_min, entry.tokens_per_min
    )
    if buckets is None:
        return None
    verdict = buckets.admit()
    info.buckets = buckets
    info.ratelimit_headers = verdict.headers
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


def _with_usage(payload: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """The body with ``stream_options.include_usage`` on; True if the client had it off."""
    options = payload.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return body, False  # the engine will say what is wrong with it
    if options.get("include_usage") is True:
        return body, False
    payload["stream_options"] = {**options, "include_usage": True}
    return json.dumps(payload).encode("utf-8"), True


def _read_usage(data: bytes, at: int) -> dict[str, Any] | None:
    """The JSON object after the ``"usage"`` key starting at ``at``, or None."""
    colon = data.find(b":", at)
    if colon < 0:
        return None
    try:
        value, _ = _decoder.raw_decode(data[colon + 1 :].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _note_usage(info: RequestInfo, usage: dict[str, Any]) -> None:
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int):
        info.prompt_tokens = prompt
    if isinstance(completion, int):
        info.completion_tokens = completion


def _charge(request: web.Request, info: RequestInfo, *, stream: bool) -> None:
    """Count the request's tokens in the metrics and its key's token bucket.

    A stream cut or abandoned before its usage event still used the engine: it is charged
    an estimate (completion: the events relayed; prompt: the upstream's count if one was
    seen, else a quarter of the prompt's characters), marked ``estimated`` in the log line.
    """
    prompt, completion = info.prompt_tokens, info.completion_tokens
    metrics = request.app[METRICS]
    model = info.served_model or "-"
    if stream and completion is None and info.events_relayed:
        completion = info.events_relayed
        if prompt is None:
            prompt = _prompt_chars(info.payload) // 4
        info.prompt_tokens, info.completion_tokens = prompt, completion
        info.tokens_estimated = True
        metrics.estimated_tokens[(model, "prompt")] += prompt
        metrics.estimated_tokens[(model, "completion")] += completion
    if prompt is None and completion is None:
        return
    metrics.count_tokens(model, prompt, completion)
    if info.buckets is not None:
        info.buckets.spend_tokens((prompt or 0) + (completion or 0))


def _prompt_chars(payload: dict[str, Any] | None) -> int:
    """Characters of the prompt: ``prompt`` (text or list of texts) or the messages' text."""
    if payload is None:
        return 0
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) for p in prompt if isinstance(p, str))
    total = 0
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # parts: {"type": "text", "text": …}
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total


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
    info.payload = payload
    stream = payload.get("stream") is True

    config = request.app[CONFIG]
    routes = request.app[LIVE].snapshot.routes
    canonical = routes.resolve(model)
    client = info.client_entry
    if client is not None and not (client.allows(model) or client.allows(canonical)):
        return openai_error(
            403,
            f"this key may not use model {model[:200]!r}",
            INVALID_REQUEST,
            "model_not_allowed",
            param="model",
        )
    if client is not None:
        limited = _rate_limit(request, client, info)
        if limited is not None:
            return limited

    # The model itself, then its fallbacks (those the key may use), each tried only when
    # every replica of the one before failed with nothing sent to the client yet.
    plan = [canonical]
    plan += [f for f in routes.fallbacks(canonical) if client is None or client.allows(f)]
    on_demand = request.app[ON_DEMAND]
    if on_demand.manages(canonical):
        # The one on-demand hook: it may start the model's job and wait for it first; it
        # then calls ``proceed`` with the ready replicas (and its SSE response, if open).
        info.routed = True
        proceed = functools.partial(_proceed, request, payload, body, stream, info, [canonical])
        return await on_demand.serve(
            request, info, canonical, stream, routes.pick(canonical), proceed
        )
    if not any(routes.upstreams(served) for served in plan):
        info.routed = routes.is_known(model)
        return _no_route(routes, model[:200], canonical, config.retry_after_s)
    info.routed = True
    return await _proceed(request, payload, body, stream, info, plan, None, None)


async def _proceed(
    request: web.Request,
    payload: dict[str, Any],
    body: bytes,
    stream: bool,
    info: RequestInfo,
    plan: list[str],
    candidates: tuple[Upstream, ...] | None,
    out: web.StreamResponse | None,
) -> web.StreamResponse:
    """Admit, then forward to the replicas of each name in ``plan`` in turn (the model, then
    its fallbacks). ``candidates``, if given, are the first name's replicas (the on-demand
    controller found them ready); a stream goes into ``out`` if it is given (already
    prepared, by the on-demand controller's keep-alives)."""
    config = request.app[CONFIG]
    routes = request.app[LIVE].snapshot.routes
    model = payload["model"]
    canonical = plan[0]
    if out is not None:
        info.committed = True
    strip_usage = False
    if stream and not request.path.endswith("/embeddings"):
        body, strip_usage = _with_usage(payload, body)

    admission = request.app[ADMISSION]
    full = admission.enter(canonical)
    if full is not None:
        return _at_capacity(model[:200], full, config.retry_after_s)
    inflight = request.app[INFLIGHT]
    task = asyncio.current_task()
    if task is not None:
        inflight.enter(task)
    try:
        failure: _Failure | None = None
        for served in plan:
            replicas = candidates if candidates and served == canonical else routes.pick(served)
            if not replicas:
                continue
            info.served_model = served
            # The engine knows its model by its own name, not by an alias or the name
            # the client asked for; only then is the body re-serialized.
            served_body = body if served == model else _renamed(payload, served)
            answer = await _forward(request, replicas, served_body, stream, strip_usage, info, out)
            if not isinstance(answer, _Failure):
                if served != canonical:
                    request.app[METRICS].fallbacks[(canonical, served)] += 1
                return answer
            failure = answer
        if failure is None:  # not reached: the table is immutable, and checked above
            return _no_route(routes, model[:200], canonical, config.retry_after_s)
        info.upstream = None
        info.outcome = failure.code
        return failure.response()
    except asyncio.CancelledError:
        if task is None or not inflight.cancelled_by_shutdown(task) or info.committed:
            raise  # the client left, or a stream's 200 is out: the connection just closes
        if sys.version_info >= (3, 11):
            task.uncancel()
        info.outcome = "gateway_shutting_down"
        return _shutting_down(config)
    finally:
        admission.leave(canonical)
        if task is not None:
            inflight.leave(task)


def _renamed(payload: dict[str, Any], model: str) -> bytes:
    return json.dumps({**payload, "model": model}).encode("utf-8")


def _at_capacity(model: str, full: str, retry_after_s: int) -> web.Response:
    if full == "model":
        message = f"model {model!r} has as many requests in flight as it may; retry shortly"
    else:
        message = "the gateway has as many requests in flight as it may; retry shortly"
    return openai_error(
        503,
        message,
        SERVER_ERROR,
        f"{full}_at_capacity",
        headers={"Retry-After": str(retry_after_s)},
    )


@dataclass(frozen=True, slots=True)
class _Failure:
    """Why a replica could not answer, while nothing had reached the client yet: the
    answer the client gets if no other replica can (the last one wins)."""

    status: int
    code: str
    message: str
    retry_after: str | None = None

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return openai_error(self.status, self.message, SERVER_ERROR, self.code, headers=headers)


@dataclass(frozen=True, slots=True)
class _Primed:
    """A stream whose status and first whole event are in: it is safe to commit the 200."""

    first: bytes


async def _forward(
    request: web.Request,
    candidates: tuple[Upstream, ...],
    body: bytes,
    stream: bool,
    strip_usage: bool,
    info: RequestInfo,
    out: web.StreamResponse | None = None,
) -> web.StreamResponse | _Failure:
    """Send to the best replica; on to the next while nothing has reached the client.

    A replica that cannot be reached, answers 5xx, breaks before its first event, or opens
    its stream with an error event is passed over (and counted against it by the balancer);
    the client gets the last replica's failure if none answers. 4xx and timeouts are final:
    the client's request is at fault, or the time-to-first-token clock has run out. When
    every replica failed, the last failure is returned (the caller may try a fallback).
    """
    config = request.app[CONFIG]
    session = request.app[SESSION]
    balancer = request.app[BALANCER]
    metrics = request.app[METRICS]
    inflight = request.app[INFLIGHT]
    task = asyncio.current_task()
    suffix = request.path[len(API_PREFIX) :]
    loop = asyncio.get_running_loop()
    model = candidates[0].model
    failure = _unreachable("upstream_unavailable", model, len(candidates), config)
    for upstream in balancer.order(candidates):
        info.upstream = upstream.source
        balancer.started(upstream)
        response: aiohttp.ClientResponse | None = None
        try:
            sent_at = info.sent_at = time.monotonic()
            # The time-to-first-token clock runs from here to the first byte of the body.
            first_byte_by = loop.time() + config.first_token_timeout_s
            try:
                async with timeout_at(first_byte_by):
                    sent = await _send(session, upstream, suffix, body, info.request_id)
            except asyncio.TimeoutError:
                return _timeout_error(upstream, "upstream_first_token_timeout", config)
            except aiohttp.ClientError as exc:
                return _bad_upstream(upstream, f"{type(exc).__name__}: {exc}")
            if isinstance(sent, str):
                failure = _unreachable(sent, model, len(candidates), config)
                balancer.failed(upstream)
                metrics.upstream_failures[upstream.source] += 1
                continue
            response = sent
            if task is not None:
                inflight.reading(task, response.content)
            metrics.upstream_latency.observe(model, time.monotonic() - sent_at)
            answer = await _attempt(request, response, upstream, stream, info, first_byte_by)
            if isinstance(answer, _Failure):
                failure = answer
                balancer.failed(upstream)
                metrics.upstream_failures[upstream.source] += 1
                log.warning(
                    "upstream failed before the first byte",
                    extra=fields(
                        request_id=info.request_id,
                        upstream=upstream.source,
                        status=answer.status,
                        error=answer.message,
                    ),
                )
                continue
            balancer.succeeded(upstream)
            if isinstance(answer, web.StreamResponse):
                info.client_first_at = time.monotonic()
                _observe_timing(metrics, info, model)
                _charge(request, info, stream=False)
                return answer
            try:
                return await _relay_stream(
                    request, response, upstream, answer.first, strip_usage, info, out
                )
            finally:
                _observe_timing(metrics, info, model)
                _charge(request, info, stream=True)
        finally:
            if response is not None:
                if task is not None:
                    inflight.reading(task, None)
                # A response read to its end goes back to the pool; anything else (a cut
                # stream, a client that left, a cancelled handler) closes the connection,
                # which is what tells the engine to stop generating.
                if response.content.at_eof():
                    response.release()
                else:
                    response.close()
            balancer.finished(upstream)

    return failure


def _observe_timing(metrics: Metrics, info: RequestInfo, model: str) -> None:
    """Queue time, time to first token and the gateway's own share, once per request."""
    sent, upstream_first, client_first = info.sent_at, info.upstream_first_at, info.client_first_at
    if sent is None:
        return
    queue_s = sent - info.started
    metrics.queue.observe(model, queue_s)
    if client_first is None:
        return
    metrics.time_to_first_token.observe(model, client_first - info.started)
    if upstream_first is not None:
        metrics.overhead.observe(model, queue_s + max(0.0, client_first - upstream_first))


def _unreachable(code: str, model: str, tried: int, config: GatewayConfig) -> _Failure:
    if code == "upstream_connect_timeout":
        return _Failure(
            504,
            code,
            f"no upstream for model {model!r} accepted a connection within "
            f"{config.connect_timeout_s:g} s ({tried} tried)",
        )
    return _Failure(
        503,
        "upstream_unavailable",
        f"no upstream for model {model!r} could be reached ({tried} tried)",
        str(config.retry_after_s),
    )


async def _send(
    session: aiohttp.ClientSession, upstream: Upstream, suffix: str, body: bytes, request_id: str
) -> aiohttp.ClientResponse | str:
    """The upstream's response (headers read), or the error code if it cannot be reached:
    ``upstream_connect_timeout`` or ``upstream_unavailable``."""
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
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return "upstream_connect_timeout"
    return "upstream_unavailable"


def _timeout_message(upstream: Upstream, code: str, config: GatewayConfig) -> str:
    if code == "upstream_first_token_timeout":
        return (
            f"upstream {upstream.source} sent no first token within "
            f"{config.first_token_timeout_s:g} s"
        )
    return f"upstream {upstream.source} sent nothing for {config.idle_timeout_s:g} s"


def _timeout_error(upstream: Upstream, code: str, config: GatewayConfig) -> web.Response:
    return openai_error(504, _timeout_message(upstream, code, config), SERVER_ERROR, code)


def _bad_upstream(upstream: Upstream, what: str) -> web.Response:
    return openai_error(
        502, f"upstream {upstream.source} failed: {what}", SERVER_ERROR, "upstream_error"
    )


async def _attempt(
    request: web.Request,
    response: aiohttp.ClientResponse,
    upstream: Upstream,
    stream: bool,
    info: RequestInfo,
    first_byte_by: float,
) -> web.StreamResponse | _Primed | _Failure:
    """The final answer, a stream ready to relay, or a failure another replica may fix."""
    if response.status in (401, 403):
        # The upstream refused the gateway's key, not the client's: passing the status on
        # would tell the client its own key is wrong.
        return _bad_upstream(
            upstream, f"it answered {response.status} to the gateway's key (stale record?)"
        )
    config = request.app[CONFIG]
    if stream and response.status == 200 and response.content_type == "text/event-stream":
        return await _first_event(response.content, upstream, first_byte_by, config, info)
    try:
        body = await _read_body(response.content, first_byte_by, config.idle_timeout_s)
    except _UpstreamTimeout as exc:
        return _timeout_error(upstream, exc.code, config)
    except ShuttingDown:
        return _shutting_down(config)
    except aiohttp.ClientError as exc:
        return _Failure(
            502, "upstream_error", f"upstream {upstream.source} failed: {type(exc).__name__}"
        )
    info.upstream_first_at = time.monotonic()
    headers = {"Content-Type": response.headers.get("Content-Type", "application/json")}
    retry_after = response.headers.get("Retry-After")
    if response.status >= 500:
        message = f"upstream {upstream.source} answered {response.status}"
        if _is_json_object(body):
            message += f": {_error_message(body)}"
        if response.status == 503:
            return _Failure(503, "upstream_unavailable", message, retry_after or "1")
        return _Failure(502, "upstream_error", message)
    if response.status >= 400:
        if not _is_json_object(body):
            return _bad_upstream(upstream, f"it answered {response.status} without a JSON error")
        if retry_after is not None and response.status == 429:
            headers["Retry-After"] = retry_after
    if response.status == 200:
        at = body.rfind(b'"usage"')
        usage = _read_usage(body, at) if at >= 0 else None
        if usage is not None:
            _note_usage(info, usage)
    return web.Response(status=response.status, body=body, headers=headers)


async def _first_event(
    content: aiohttp.StreamReader,
    upstream: Upstream,
    first_byte_by: float,
    config: GatewayConfig,
    info: RequestInfo,
) -> web.StreamResponse | _Primed | _Failure:
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
                if len(data) >= _MAX_CARRY_BYTES:
                    break
                chunk = await content.readany()
                if not chunk:
                    return _Failure(
                        502,
                        "upstream_error",
                        f"upstream {upstream.source} ended the stream before its first event",
                    )
                if not data:
                    info.upstream_first_at = time.monotonic()
                data += chunk
    except asyncio.TimeoutError:
        return _timeout_error(upstream, "upstream_first_token_timeout", config)
    except ShuttingDown:
        return _shutting_down(config)
    except aiohttp.ClientError as exc:
        return _Failure(
            502,
            "upstream_error",
            f"upstream {upstream.source} broke off the stream before its first event "
            f"({type(exc).__name__})",
        )
    if _engine_error_at(data.lstrip()) == 0:
        message = _engine_error_message(data.lstrip().split(b"\n\n", 1)[0])
        return _Failure(502, "upstream_error", f"upstream {upstream.source} reported: {message}")
    return _Primed(data)


_SHUTTING_DOWN = "the gateway is shutting down; send the request again"


def _shutting_down(config: GatewayConfig) -> web.Response:
    # Another gateway (or this one, restarted) may answer it: 503 + Retry-After.
    return openai_error(
        503,
        _SHUTTING_DOWN,
        SERVER_ERROR,
        "gateway_shutting_down",
        headers={"Retry-After": str(config.retry_after_s)},
    )


class _UpstreamTimeout(Exception):
    """The upstream was silent too long; ``code`` says in which phase."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


async def _read_body(content: aiohttp.StreamReader, first_byte_by: float, idle_s: float) -> bytes:
    """The whole body: its first byte by ``first_byte_by``, no gap after it over ``idle_s``."""
    parts: list[bytes] = []
    code = "upstream_first_token_timeout"
    deadline = first_byte_by
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with timeout_at(deadline):
                chunk = await content.readany()
        except asyncio.TimeoutError:
            raise _UpstreamTimeout(code) from None
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        code = "upstream_idle_timeout"
        deadline = loop.time() + idle_s


class _Watch:
    """Bounds the upstream's silence in a stream while the gateway waits for it.

    One timer per stream that wakes up about once per limit, instead of a timer armed and
    cancelled around every read (a few microseconds per chunk): a read only notes when it
    started waiting. When a wait passes ``idle_s``, the upstream's stream is failed with
    ``_UpstreamTimeout``, which the pending read raises. The watch starts once the first
    event is in (``_first_event`` keeps the time-to-first-token clock until then).
    """

    __slots__ = ("_content", "_handle", "_idle_s", "_loop", "waiting_since")

    def __init__(self, content: aiohttp.StreamReader, idle_s: float) -> None:
        self._content = content
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
        self._content.set_exception(_UpstreamTimeout("upstream_idle_timeout"))

    def close(self) -> None:
        """Stop the timer."""
        self._handle.cancel()


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def _engine_error_at(chunk: bytes) -> int:
    """Where an engine's in-band error event (``data: {"error": …}``) starts, or -1.

    One bytes search per chunk; only a hit is looked at more closely.
    """
    at = chunk.find(_ERROR_KEY)
    while at >= 0:
        start = at - 6 if chunk[at - 6 : at] == b"data: " else at - 5
        if (
            start >= 0
            and chunk[start : start + 5] == b"data:"
            and (start == 0 or chunk[start - 1 : start] == b"\n")
        ):
            return start
        at = chunk.find(_ERROR_KEY, at + 1)
    return -1


def _engine_error_message(event: bytes) -> str:
    """The engine's message from its error event (parsed: this is not the hot path)."""
    return _error_message(event.strip()[len(b"data:") :])


def _error_message(data: bytes) -> str:
    """The message of an OpenAI-shaped error object, or the bytes themselves (cut short)."""
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return data[:500].decode("utf-8", "replace")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:2000]
    return str(error)[:2000]


async def _relay_stream(
    request: web.Request,
    response: aiohttp.ClientResponse,
    upstream: Upstream,
    first: bytes,
    strip_usage: bool,
    info: RequestInfo,
    out: web.StreamResponse | None = None,
) -> web.StreamResponse:
    """Commit the 200 and relay ``first`` (already read) and the rest of the stream; into
    ``out`` if it is given (already prepared: an on-demand wait sent keep-alives on it)."""
    info.committed = True
    if out is None:
        out = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        await out.prepare(request)
    config = request.app[CONFIG]
    content = response.content
    watch = _Watch(content, config.idle_timeout_s)
    gaps = Gaps()
    try:
        return await _relay_events(
            out, content, first, watch, gaps, upstream, strip_usage, info, config
        )
    finally:
        watch.close()
        request.app[METRICS].inter_token_latency.merge(upstream.model, gaps.counts, gaps.total)


async def _relay_events(
    out: web.StreamResponse,
    content: aiohttp.StreamReader,
    first: bytes,
    watch: _Watch,
    gaps: Gaps,
    upstream: Upstream,
    strip_usage: bool,
    info: RequestInfo,
    config: GatewayConfig,
) -> web.StreamResponse:
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
            except _UpstreamTimeout as exc:
                failure = (_timeout_message(upstream, exc.code, config), exc.code)
                break
            except ShuttingDown:
                failure = (_SHUTTING_DOWN, "gateway_shutting_down")
                break
            except aiohttp.ClientError as exc:
                if tail.rstrip().endswith(_DONE):
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
            if cut < 0 and len(chunk) < _MAX_CARRY_BYTES:
                carry = chunk
                continue
            if cut >= 0:
                end = cut + (2 if chunk[cut + 1 : cut + 2] == b"\n" else 3)
                chunk, carry = chunk[:end], chunk[end:]
        if _ERROR_KEY in chunk:
            at = _engine_error_at(chunk)
            if at >= 0:
                # The engine reports its own failure in-band: what came before it is
                # relayed, the error is passed on in the gateway's shape, and the stream
                # ends there without [DONE], whatever the engine sends after it.
                message = _engine_error_message(chunk[at:].split(b"\n\n", 1)[0])
                failure = (f"upstream {upstream.source} reported: {message}", "upstream_error")
                chunk, carry = chunk[:at], b""
        if _USAGE_MARKS[0] in chunk or _USAGE_MARKS[1] in chunk:
            chunk = _take_usage(chunk, strip_usage, info)
        if chunk:
            try:
                await out.write(chunk)
            except ConnectionResetError:
                info.outcome = "client_disconnected"
                return out
            if not last_read:
                info.client_first_at = last_read = loop.time()
            info.events_relayed += chunk.count(b"\n\n")
            tail = (tail + chunk[-_TAIL_BYTES:])[-_TAIL_BYTES:]
        if failure is not None:
            break
    if carry and failure is None:
        try:
            await out.write(carry)
        except ConnectionResetError:
            info.outcome = "client_disconnected"
            return out
        tail = (tail + carry[-_TAIL_BYTES:])[-_TAIL_BYTES:]
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


def _take_usage(events: bytes, strip: bool, info: RequestInfo) -> bytes:
    """Note the usage in ``events`` (whole SSE events); drop its event if ``strip`` and it
    carries nothing else (``"choices": []``, as OpenAI's usage chunk does)."""
    at = events.find(_USAGE_MARKS[0])
    if at < 0:
        at = events.find(_USAGE_MARKS[1])
    start = events.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", at)
    end = len(events) if end < 0 else end + 2
    event = events[start:end]
    data = event.strip()
    if not data.startswith(b"data:"):
        return events
    try:
        chunk = json.loads(data[len(b"data:") :])
    except ValueError:
        return events
    if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
        return events
    _note_usage(info, chunk["usage"])
    if strip and not chunk.get("choices"):
        return events[:start] + events[end:]
    return events


def _event_separator(tail: bytes) -> bytes:
    """What to write so the next event starts on its own, after whatever came before."""
    if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\n\n"
