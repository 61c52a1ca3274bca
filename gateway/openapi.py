"""``GET /openapi.json``: a small static OpenAPI 3 description of the gateway.

It describes what the gateway itself checks (the routes, the bearer key, a JSON body with a
``model``) and its error shape; the bodies' other fields are the engines' business and are
left open. ``document()`` builds the dict; the app serializes it once when it is created.
"""

from __future__ import annotations

from typing import Any

_ERROR_STATUSES = {
    "400": "the body is not a JSON object with a model",
    "401": "missing, wrong or expired API key",
    "403": "the key may not use this model",
    "404": "no such model",
    "413": "the body is over the limit",
    "429": "the key is over its rate limit or its on-demand job limit (Retry-After)",
    "502": "every replica failed before the first byte (5xx, broke, error event), or the "
    "engine answered something unusable",
    "503": "no ready replica, an on-demand start is slow or failed, a concurrency cap is full, "
    "or the gateway is shutting down (Retry-After)",
    "504": "the engine did not connect, start or continue in time",
}

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _errors(*statuses: str) -> dict[str, Any]:
    return {
        status: {
            "description": _ERROR_STATUSES[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for status in statuses
    }


def _proxied(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": body}},
            },
            "responses": {
                "200": {
                    "description": "the engine's answer: JSON, or text/event-stream when "
                    "stream is true (a failure after the first byte is an in-band "
                    "error event and no [DONE])",
                    "headers": {
                        "x-mt-served-model": {
                            "description": "the model that answered: the one asked for, "
                            "the model an alias stands for, or a fallback",
                            "schema": {"type": "string"},
                        }
                    },
                    "content": {"application/json": {}, "text/event-stream": {}},
                },
                **_errors("400", "401", "403", "404", "413", "429", "502", "503", "504"),
            },
        }
    }


def _body(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["model", *required],
        "properties": {"model": {"type": "string", "minLength": 1}, **properties},
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's endpoints."""
    messages = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
        },
    }
    stream = {"type": "boolean"}
    max_tokens = {"type": "integer", "minimum": 1}
    listing = {"200": {"description": "a list", "content": {"application/json": {}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ModelTainer gateway",
            "version": "1",
            "description": "An OpenAI-compatible gateway; see docs/gateway.md.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "liveness, routable models, and per model its ready replicas",
                    "security": [],
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1"}},
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "every model the key may use, each with an mt field: ready, "
                    "pool, starting or on_demand, whether it starts on request, its last start",
                    "responses": {**listing, **_errors("401")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text format",
                    "responses": {"200": {"description": "metrics"}, **_errors("401")},
                }
            },
            "/v1/chat/completions": _proxied(
                "a chat completion",
                _body(
                    ["messages"],
                    {"messages": messages, "stream": stream, "max_tokens": max_tokens},
                ),
            ),
            "/v1/completions": _proxied(
                "a text completion",
                _body(
                    ["prompt"],
                    {"prompt": {"type": "string"}, "stream": stream, "max_tokens": max_tokens},
                ),
            ),
            "/v1/embeddings": _proxied(
                "embeddings", _body(["input"], {"input": {"type": "string"}})
            ),
        },
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
