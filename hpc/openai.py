"""The OpenAI wire format the gateway and the swap pool both speak: paths, errors, SSE.

Plain bytes and dicts only: each server builds its own responses from them, so the core
holds no aiohttp server object and never imports the gateway.

An error, in a response body or as a stream's last event:

    {"error": {"message": "...", "type": "...", "param": null, "code": "..."}}

``type`` is OpenAI's own (``invalid_request_error`` for 4xx, ``server_error`` for 5xx) so
clients that branch on it keep working; ``code`` says what happened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

API_PREFIX = "/v1"
# The POST routes the swap pool forwards to an engine, body untouched (the gateway routes
# these and more: gateway.proxy.apis), the agents' APIs among them (vLLM and llama-server
# serve the Responses and the Messages API themselves).
PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"

# A stream's response headers; X-Accel-Buffering stops nginx in front from coalescing events.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Headers of a server's own error response that describe its plain-text body, not ours.
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})
# The event that says a stream is whole; a stream cut short never gets it.
DONE = b"data: [DONE]"


def error_object(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, object]:
    """An OpenAI error object, ready for ``json.dumps``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object (also used for in-band stream errors)."""
    return json.dumps(error_object(message, type_, code, param)).encode("utf-8")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """An error answer as a value (what a refusal returns): status, the OpenAI error's
    fields, and ``Retry-After`` if the client may try again."""

    status: int
    message: str
    type: str
    code: str
    param: str | None = None
    retry_after: str | None = None

    def body(self) -> bytes:
        """The JSON bytes of its error object."""
        return error_body(self.message, self.type, self.code, self.param)


def error_event(body: bytes) -> bytes:
    """End a stream with an in-band error: the event for an error ``body``.

    A stream whose 200 is already out cannot change its status, so its failure is its last
    event, and no ``[DONE]`` follows: a client can tell a cut answer from a whole one.
    """
    return b"data: " + body + b"\n\n"


def http_error(
    status: int, method: str, path: str, reason: str, max_body: int
) -> tuple[str, str, str | None]:
    """(message, type, code) for an HTTP error the server itself raised (404, 405, 413, …)."""
    code: str | None
    if status == 404:
        message, code = f"no route for {method} {path}", "not_found"
    elif status == 405:
        message, code = f"method {method} is not allowed on {path}", "method_not_allowed"
    elif status == 413:
        message = f"request body is larger than the gateway's limit of {max_body} bytes"
        code = "request_too_large"
    else:
        message, code = reason or f"HTTP {status}", None
    return message, INVALID_REQUEST if status < 500 else SERVER_ERROR, code


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a server's own HTTP error (``Allow``, say) that an OpenAI body keeps."""
    return {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
