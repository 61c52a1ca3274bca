"""Every error the gateway answers, in OpenAI's shape.

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

The wire format itself (error bodies, in-band stream errors) is ``hpc.openai``'s, shared
with the swap pool; this module is its aiohttp side. Handlers return ``openai_error(...)``
themselves; ``error_middleware`` catches the rest: the
HTTP exceptions aiohttp raises (404 unknown path, 405, 413 from ``client_max_size``) and
any exception a handler let escape (500, logged with its traceback).

    status  type                    code
    400     invalid_request_error   invalid_json · invalid_body · missing_model
    401     invalid_request_error   invalid_api_key
    403     invalid_request_error   model_not_allowed
    404     invalid_request_error   model_not_found · not_found (path)
    405     invalid_request_error   method_not_allowed
    408     invalid_request_error   request_timeout
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

import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.logs import LOGGER_NAME, fields
from hpc.openai import SERVER_ERROR, ErrorReply, error_body, http_error, kept_headers

log = logging.getLogger(f"{LOGGER_NAME}.errors")


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


def reply_response(reply: ErrorReply) -> web.Response:
    """The response for an error answer given as a value."""
    headers = {"Retry-After": reply.retry_after} if reply.retry_after else None
    return openai_error(
        reply.status, reply.message, reply.type, reply.code, param=reply.param, headers=headers
    )


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> web.Response:
    headers = kept_headers(exc.headers)
    message, type_, code = http_error(
        exc.status, request.method, request.path, exc.reason, request.client_max_size
    )
    return openai_error(exc.status, message, type_, code, headers=headers)


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
