"""``GET /openapi.json``: a small static OpenAPI 3 description of the gateway.

It describes what the gateway itself checks (the routes, the key as a bearer token or
``x-api-key``, a JSON body with a ``model``, a form with a ``model`` field for audio) and
its error shapes (OpenAI's; Anthropic's on ``/v1/messages``); the bodies' other fields are
the engines' business and are left open. ``document()`` builds the dict; the app
serializes it once when it is created.
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


_ANTHROPIC_ERROR_SCHEMA = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}


def _errors(*statuses: str, schema: str = "Error") -> dict[str, Any]:
    return {
        status: {
            "description": _ERROR_STATUSES[status],
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
        for status in statuses
    }


def _proxied(
    summary: str,
    body: dict[str, Any],
    *,
    media: str = "application/json",
    errors: str = "Error",
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {media: {"schema": body}},
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
                **_errors(
                    "400", "401", "403", "404", "413", "429", "502", "503", "504", schema=errors
                ),
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
        "security": [{"bearer": []}, {"apiKey": []}],
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
            "/v1/models/{id}": {
                "get": {
                    "summary": "one model of the list (a name may hold slashes)",
                    "parameters": [
                        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        "200": {"description": "the model", "content": {"application/json": {}}},
                        **_errors("401", "404"),
                    },
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
            "/v1/responses": _proxied(
                "a response (OpenAI's Responses API); a follow-up naming previous_response_id "
                "goes to the replica that holds it",
                _body(
                    ["input"],
                    {
                        "input": {"type": "string"},
                        "stream": stream,
                        "previous_response_id": {"type": "string"},
                    },
                ),
            ),
            "/v1/messages": _proxied(
                "a message (Anthropic's Messages API); errors in Anthropic's shape",
                _body(
                    ["messages", "max_tokens"],
                    {"messages": messages, "max_tokens": max_tokens, "stream": stream},
                ),
                errors="AnthropicError",
            ),
            "/v1/messages/count_tokens": _proxied(
                "a prompt's token count (Anthropic's shape)",
                _body(["messages"], {"messages": messages}),
                errors="AnthropicError",
            ),
            "/tokenize": _proxied(
                "the engine's tokenizer (at its root)", _body([], {"content": {"type": "string"}})
            ),
            "/detokenize": _proxied(
                "the engine's detokenizer (at its root)",
                _body([], {"tokens": {"type": "array", "items": {"type": "integer"}}}),
            ),
            "/v1/rerank": _proxied(
                "documents ranked against a query, where the engine serves it",
                _body([], {"query": {"type": "string"}}),
            ),
            "/v1/score": _proxied(
                "pair scores (vLLM), where the engine serves it",
                _body([], {"text_1": {"type": "string"}}),
            ),
            "/v1/audio/transcriptions": _proxied(
                "a transcription, where the engine serves it: a form, model a field",
                _body(["file"], {"file": {"type": "string", "format": "binary"}}),
                media="multipart/form-data",
            ),
        },
        "components": {
            "schemas": {"Error": _ERROR_SCHEMA, "AnthropicError": _ANTHROPIC_ERROR_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
