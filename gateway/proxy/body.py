"""A proxied request's body: admitted before it is read, read within a deadline, parsed once.

The gateway-wide cap (``admission``) is checked before a byte of the body is read, and the
body must arrive whole within ``body_timeout_s`` of the headers: a client that sends
``Content-Length: 1000`` and then one byte gets 408 and its connection closed, and many
such clients cannot hold more than the cap. The body is parsed once; one nested too
deeply for the parser (``[[[[…``) is a 400 like any other bad JSON, never a 500.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.errors import openai_error
from gateway.proxy.failures import at_capacity
from gateway.proxy.form import Form, boundary_of, read_form
from hpc.openai import INVALID_REQUEST

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # aiohttp itself depends on async-timeout before Python 3.11
    from async_timeout import timeout  # type: ignore[import-not-found,unused-ignore]


@dataclass(frozen=True, slots=True)
class Body:
    """The request's bytes as sent, and the JSON object they hold (with its ``model``); for
    a form, its fields as that object (``model``, ``stream``) and where ``model`` sits."""

    raw: bytes
    payload: dict[str, Any]
    model: str
    form: Form | None = None


async def read_body(
    request: web.Request, config: GatewayConfig, admission: Admission, *, form: bool = False
) -> Body | web.Response:
    """The request's body, or the error response that refuses it (503, 408, 400); with
    ``form``, a ``multipart/form-data`` one (``parse_form``)."""
    if not admission.start_reading():
        return at_capacity("", "gateway", config.retry_after_s)
    try:
        async with timeout(config.body_timeout_s):
            raw = await request.read()
    except asyncio.TimeoutError:
        response = openai_error(
            408,
            f"the request body did not arrive within {config.body_timeout_s:g} s",
            INVALID_REQUEST,
            "request_timeout",
        )
        response.force_close()  # the rest of the body may still come: not on this connection
        return response
    finally:
        admission.stop_reading()
    if form:
        return parse_form(raw, request.headers.get("Content-Type", ""))
    return parse_body(raw)


def parse_form(raw: bytes, content_type: str) -> Body | web.Response:
    """``raw`` as a ``multipart/form-data`` body with a ``model`` field, or the 400."""
    boundary = boundary_of(content_type)
    if boundary is None:
        return openai_error(
            400,
            "request body must be multipart/form-data (with a boundary)",
            INVALID_REQUEST,
            "invalid_body",
        )
    fields = read_form(raw, boundary)
    if fields is None:
        return openai_error(
            400,
            "request form needs a 'model' field (a name from GET /v1/models)",
            INVALID_REQUEST,
            "missing_model",
            param="model",
        )
    return Body(raw, {"model": fields.model, "stream": fields.stream}, fields.model, fields)


def parse_body(raw: bytes) -> Body | web.Response:
    """``raw`` as a JSON object with a ``model``, or the 400 that says what is wrong."""
    try:
        payload = json.loads(raw)
    except RecursionError:
        return openai_error(
            400, "request body is nested too deeply to parse", INVALID_REQUEST, "invalid_json"
        )
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
    return Body(raw, payload, model)
