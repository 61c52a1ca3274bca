"""Every error the gateway answers, in OpenAI's shape.

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

Handlers return ``openai_error(...)`` themselves; ``error_middleware`` catches the rest: the
HTTP exceptions aiohttp raises (404 unknown path, 405, 413 from ``client_max_size``) and
any exception a handler let escape (500, logged with its traceback).

    status  type                    code
    400     invalid_request_error   invalid_json · invalid_body · missing_model
    401     invalid_request_error   invalid_api_key
    403     invalid_request_error   model_not_allowed
    404     invalid_request_error   model_not_found · not_found (path)
    405     invalid_request_error   method_not_allowed
    413     invalid_request_error   request_too_large
    429     invalid_request_error   rate_limit_requests · rate_limit_tokens ·
                                    on_demand_key_limit (+ Retry-After)
    500     server_error            internal_error
    502     server_error            upstream_error
    503     server_error            no_ready_endpoint · upstream_unavailable ·
                                    model_at_capacity · gateway_at_capacity ·
                                    on_demand_starting · on_demand_start_failed ·
                                    on_demand_at_capacity · gateway_shutting_down
                                    (+ Retry-After)
    504     server_error            upstream_connect_timeout · upstream_first_token_timeout ·
                                    upstream_idle_timeout

The types are OpenAI's own (``invalid_request_error`` for 4xx, ``server_error`` for 5xx) so
clients that branch on them keep working; ``code`` says what happened.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.logs import LOGGER_NAME, fields

log = logging.getLogger(f"{LOGGER_NAME}.errors")

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# Headers of aiohttp's own error responses that describe its plain-text body, not ours.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object (also used for in-band stream errors)."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return json.dumps({"error": error}).encode("utf-8")


def openai_error(
    status: int,
    message: str,
    type: str,
    code: str | None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error response in OpenAI's shape (``type`` is OpenAI's field name)."""
    return web.Response(
        status=status,
        body=error_body(message, type, code, param),
        content_type="application/json",
        headers=dict(headers) if headers else None,
    )


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> web.Response:
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    status = exc.status
    code: str | None
    if status == 404:
        message, code = f"no route for {request.method} {request.path}", "not_found"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
        code = "method_not_allowed"
    elif status == 413:
        limit = request.client_max_size
        message = f"request body is larger than the gateway's limit of {limit} bytes"
        code = "request_too_large"
    else:
        message, code = exc.reason or f"HTTP {status}", None
    type_ = INVALID_REQUEST if status < 500 else SERVER_ERROR
    return openai_error(status, message, type_, code, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors and escaped exceptions into OpenAI-shaped responses."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _from_http_exception(exc, request)
    except Exception as exc:
        # The one boundary where an unexpected error becomes a 500 for the client; the
        # traceback goes to the log, never to the client.
        log.exception("unhandled error", extra=fields(method=request.method, path=request.path))
        return openai_error(
            500, f"internal gateway error ({type(exc).__name__})", SERVER_ERROR, "internal_error"
        )
