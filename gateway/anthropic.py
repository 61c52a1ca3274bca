"""Anthropic's wire format on the gateway's ``/v1/messages`` paths: its key header, its errors.

Anthropic's clients (the ``anthropic`` SDK, Claude Code) send their key as ``x-api-key``
(``ANTHROPIC_API_KEY``) or as ``Authorization: Bearer`` (``ANTHROPIC_AUTH_TOKEN``); the
gateway takes both alike (``gateway.app.auth_middleware``). On these paths every error the
gateway itself answers is in Anthropic's shape, which those clients parse:

    {"type": "error", "error": {"type": "not_found_error", "message": "..."}}

and a stream that fails after its 200 ends with ``event: error`` carrying the same object.
The gateway's own errors are made in OpenAI's shape everywhere (``gateway.errors``) and
turned into this one at the edge (:func:`anthropic_response`); an engine's own error body
is turned too, so a client sees one shape whoever failed.
"""

from __future__ import annotations

import json

from aiohttp import web

# The gateway's routes that speak Anthropic's Messages API.
MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
# The header Anthropic's clients send their key in (when not as a bearer token).
API_KEY_HEADER = "x-api-key"

# Anthropic's error type for each status (its API documents these); others by class.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def is_anthropic(path: str) -> bool:
    """True for a path whose errors are in Anthropic's shape."""
    return path in MESSAGES_PATHS


def error_type(status: int) -> str:
    """Anthropic's error ``type`` for an HTTP status."""
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error_object(status: int, message: str) -> dict[str, object]:
    """An Anthropic error object, ready for ``json.dumps``."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def anthropic_event(status: int, message: str) -> bytes:
    """The SSE event that ends a Messages stream with an error (after its 200)."""
    data = json.dumps(anthropic_error_object(status, message)).encode("utf-8")
    return b"event: error\ndata: " + data + b"\n\n"


def _message(body: bytes) -> str | None:
    """The message of an OpenAI-shaped (or already Anthropic-shaped) error body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return None


def anthropic_response(response: web.Response) -> web.Response:
    """``response`` (an error, in OpenAI's shape) with its body in Anthropic's shape; its
    status and headers (``Retry-After``, ``WWW-Authenticate``) kept."""
    raw = response.body if isinstance(response.body, bytes) else b""
    message = _message(raw)
    if message is None:
        message = raw[:500].decode("utf-8", "replace") or f"HTTP {response.status}"
    headers = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in ("content-type", "content-length")
    }
    converted = web.Response(
        status=response.status,
        body=json.dumps(anthropic_error_object(response.status, message)).encode("utf-8"),
        content_type="application/json",
        headers=headers,
    )
    if response.keep_alive is False:
        converted.force_close()
    return converted
