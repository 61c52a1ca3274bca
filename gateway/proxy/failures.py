"""The failure contract: which failures another replica may still fix, and the final error.

Nothing reaches the client before an upstream's status and, for a stream, its first whole
event are in. Until then a replica that cannot be reached, answers 5xx, breaks, or opens its
stream with an error event is passed over for the next (a ``Failure``, retryable); 4xx and
timeouts are final (a response). When no replica answers, the last failure is the client's.

Three clocks, each with its own 504 code: connecting (``upstream_connect_timeout``), the
first event or byte (``upstream_first_token_timeout``), the silence between chunks after it
(``upstream_idle_timeout``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import openai_error
from gateway.inflight import SHUTTING_DOWN
from gateway.routes import RouteTable, Upstream
from hpc.openai import INVALID_REQUEST, SERVER_ERROR


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a replica could not answer, while nothing had reached the client yet: the
    answer the client gets if no other replica can (the last one wins)."""

    status: int
    code: str
    message: str
    retry_after: str | None = None
    # Counts against the replica in the balancer: it could not be reached, timed out, broke,
    # or said it is overloaded or down (502/503/504). An engine's 500 to one request (its
    # body rejected, say) does not: the replica answered, and its probes judge its health.
    against_replica: bool = True
    log_detail: str | None = None  # the engine's own message, whole: for the log only

    def response(self) -> web.Response:
        """The client's answer, when no other replica could give one."""
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return openai_error(self.status, self.message, SERVER_ERROR, self.code, headers=headers)


class UpstreamTimeout(Exception):
    """The upstream was silent too long; ``code`` says in which phase."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def shutting_down(config: GatewayConfig) -> web.Response:
    """503 + Retry-After: the gateway ended the request for its shutdown."""
    # Another gateway (or this one, restarted) may answer it: 503 + Retry-After.
    return openai_error(
        503,
        SHUTTING_DOWN,
        SERVER_ERROR,
        "gateway_shutting_down",
        headers={"Retry-After": str(config.retry_after_s)},
    )


def no_route(routes: RouteTable, model: str, canonical: str, retry_after_s: int) -> web.Response:
    """404 for a name not served here; 503 for a model with no ready endpoint."""
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


def at_capacity(model: str, full: str, retry_after_s: int) -> web.Response:
    """503: admission control found the model (or the gateway) full."""
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


def unreachable(code: str, model: str, tried: int, config: GatewayConfig) -> Failure:
    """No replica could be connected to (``code`` from ``upstream.send``): retryable."""
    if code == "upstream_connect_timeout":
        return Failure(
            504,
            code,
            f"no upstream for model {model!r} accepted a connection within "
            f"{config.connect_timeout_s:g} s ({tried} tried)",
        )
    return Failure(
        503,
        "upstream_unavailable",
        f"no upstream for model {model!r} could be reached ({tried} tried)",
        str(config.retry_after_s),
    )


def timeout_message(upstream: Upstream, code: str, config: GatewayConfig) -> str:
    """What a client is told when a clock ran out (``code`` says which)."""
    if code == "upstream_first_token_timeout":
        return (
            f"upstream {upstream.source} sent no first token within "
            f"{config.first_token_timeout_s:g} s"
        )
    return f"upstream {upstream.source} sent nothing for {config.idle_timeout_s:g} s"


def timeout_error(upstream: Upstream, code: str, config: GatewayConfig) -> web.Response:
    """504: a clock ran out; final (the time-to-first-token is spent)."""
    return openai_error(504, timeout_message(upstream, code, config), SERVER_ERROR, code)


def unhealthy(model: str, limit_s: float, retry_after_s: int) -> web.Response:
    """503: every replica of ``model`` fails its health probes, and the one tried anyway
    sent nothing within ``limit_s``."""
    return openai_error(
        503,
        f"every replica of model {model!r} is failing its health checks, and the one tried "
        f"sent nothing within {limit_s:g} s",
        SERVER_ERROR,
        "upstream_unavailable",
        headers={"Retry-After": str(retry_after_s)},
    )


def bad_upstream(upstream: Upstream, what: str) -> web.Response:
    """502: the upstream answered something the client must not get; final."""
    return openai_error(
        502, f"upstream {upstream.source} failed: {what}", SERVER_ERROR, "upstream_error"
    )


def is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


def engine_error_message(event: bytes) -> str:
    """The engine's message from its error event (parsed: this is not the hot path)."""
    return error_message(event.strip()[len(b"data:") :])


# A message with one of these is an engine's traceback: for the log, not for the client.
_TRACEBACK_MARKS = ("Traceback (most recent call last)", '\n  File "')
_CLIENT_DETAIL_CHARS = 300


def client_detail(message: str) -> str | None:
    """What of an engine's error message a client may see: its first line, cut short, and
    nothing of a traceback (the whole message goes to the gateway's log)."""
    if any(mark in message for mark in _TRACEBACK_MARKS):
        return None
    first = message.strip().split("\n", 1)[0].strip()
    if not first:
        return None
    return first if len(first) <= _CLIENT_DETAIL_CHARS else first[:_CLIENT_DETAIL_CHARS] + "…"


def error_message(data: bytes) -> str:
    """The message of an OpenAI-shaped error object, or the bytes themselves (cut short)."""
    try:
        error = json.loads(data)["error"]
    except (ValueError, KeyError, TypeError):
        return data[:500].decode("utf-8", "replace")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])[:2000]
    return str(error)[:2000]
