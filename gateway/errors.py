"""Every error the gateway answers, in OpenAI's shape.

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

The wire format itself (error bodies, in-band stream errors) is ``hpc.openai``'s, shared
with the swap pool; this module is its aiohttp side. Handlers return ``openai_error(...)``
themselves; ``error_middleware`` catches the rest: the
HTTP exceptions aiohttp raises (404 unknown path, 405, 413 from ``client_max_size``), a body
aiohttp could not decode (400), and any exception a handler let escape (500, logged with its
traceback). What never reaches a handler (a request aiohttp cannot parse, a connection past
a cap) gets ``protocol_error`` or ``connection_refused`` from the connection's own handler
(``protocol.py``).

    status  type                    code
    400     invalid_request_error   invalid_json · invalid_body · missing_model ·
                                    malformed_request · previous_response_not_found
    401     invalid_request_error   invalid_api_key
    403     invalid_request_error   model_not_allowed
    404     invalid_request_error   model_not_found · not_found (path)
    405     invalid_request_error   method_not_allowed
    408     invalid_request_error   request_timeout
    413     invalid_request_error   request_too_large
    429     invalid_request_error   rate_limit_requests · rate_limit_tokens ·
                                    on_demand_key_limit (+ Retry-After)
    431     invalid_request_error   header_too_large
    500     server_error            internal_error
    502     server_error            upstream_error
    503     server_error            no_ready_endpoint · upstream_unavailable ·
                                    model_at_capacity · gateway_at_capacity ·
                                    on_demand_starting · on_demand_start_failed ·
                                    on_demand_at_capacity · gateway_shutting_down ·
                                    connection_limit · client_connection_limit
                                    (+ Retry-After)
    504     server_error            upstream_connect_timeout · upstream_first_token_timeout ·
                                    upstream_idle_timeout

On Anthropic's Messages paths (``/v1/messages``, ``/v1/messages/count_tokens``) the same
errors are in Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``
(``gateway.anthropic``).

The types are OpenAI's own (``invalid_request_error`` for 4xx, ``server_error`` for 5xx) so
clients that branch on them keep working; ``code`` says what happened.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import (
    ContentEncodingError,
    ContentLengthError,
    HttpProcessingError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.typedefs import Handler

from gateway.anthropic import anthropic_response, is_anthropic
from gateway.connections import CLIENT
from gateway.logs import LOGGER_NAME, fields
from hpc.openai import (
    INVALID_REQUEST,
    SERVER_ERROR,
    ErrorReply,
    error_body,
    http_error,
    kept_headers,
)

log = logging.getLogger(f"{LOGGER_NAME}.errors")

# aiohttp's text for the one BadHttpMessage that is about the size of the headers.
_TOO_MANY_HEADERS = "Too many headers received"
# Body errors whose text is (or quotes) the client's bytes: said in words of our own.
_BODY_ERRORS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (TransferEncodingError, "bad chunked transfer encoding"),
    (ContentLengthError, "the body is shorter than its Content-Length"),
    (ContentEncodingError, "the body's Content-Encoding cannot be decoded"),
)
# Where aiohttp's description of a parse error ends and its quote of the client's bytes
# begins (``Invalid header token:\n\n  b'...'``, ``Bad status line 'GARBAGE'``).
_QUOTE = re.compile(r"[:'\"]|\bb'|\bbytearray\(")


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


def parse_reason(exc: BaseException) -> str:
    """aiohttp's own words for what is wrong with a request, without the bytes it quotes:
    they go to the log too, and a quoted header may hold a key."""
    for kind, words in _BODY_ERRORS:
        if isinstance(exc, kind):
            return words
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    first = text.strip().split("\n", 1)[0]
    return _QUOTE.split(first, maxsplit=1)[0].strip() or type(exc).__name__


def protocol_error(status: int, exc: BaseException | None) -> ErrorReply:
    """The answer to a request aiohttp could not parse or decode (``status`` is aiohttp's:
    400), or to an error that escaped every middleware (500)."""
    if status >= 500 or exc is None:
        return ErrorReply(500, "internal gateway error", SERVER_ERROR, "internal_error")
    reason = parse_reason(exc)
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, HttpProcessingError) and exc.message == _TOO_MANY_HEADERS
    ):
        return ErrorReply(
            431,
            f"request line or headers too large: {reason}",
            INVALID_REQUEST,
            "header_too_large",
        )
    return ErrorReply(
        400, f"malformed HTTP request: {reason}", INVALID_REQUEST, "malformed_request"
    )


def connection_refused(cap: str, retry_after_s: int) -> ErrorReply:
    """The answer to a connection past a cap: ``total`` (the gateway's) or ``client``."""
    retry_after = str(retry_after_s)
    if cap == CLIENT:
        return ErrorReply(
            503,
            "too many connections open from your address: close idle ones, or retry later",
            SERVER_ERROR,
            "client_connection_limit",
            retry_after=retry_after,
        )
    return ErrorReply(
        503,
        "the gateway has too many connections open; retry later",
        SERVER_ERROR,
        "connection_limit",
        retry_after=retry_after,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTTP errors and escaped exceptions into OpenAI-shaped responses
    (Anthropic-shaped on its Messages paths: ``gateway.anthropic``)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _from_http_exception(exc, request)
    except web.RequestPayloadError as exc:
        # A body aiohttp could not decode (bad chunked encoding, say): the client's fault.
        response = reply_response(protocol_error(400, exc.__cause__ or exc))
        response.force_close()  # the parser lost its place in the stream: not this connection
        # Nothing more is read from the body: aiohttp would otherwise drain it after the
        # response, meet the same error again and log it as an unhandled exception.
        request.content.feed_eof()
    except Exception as exc:
        # The one boundary where an unexpected error becomes a 500 for the client; the
        # traceback goes to the log, never to the client.
        log.exception("unhandled error", extra=fields(method=request.method, path=request.path))
        response = openai_error(
            500, f"internal gateway error ({type(exc).__name__})", SERVER_ERROR, "internal_error"
        )
    return anthropic_response(response) if is_anthropic(request.path) else response
