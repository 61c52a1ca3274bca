"""A model's max_tokens default and cap (``limits:`` in models.yaml) applied to a request.

A UI that sends no output limit, or an agent that asks for 32,000 tokens, would otherwise
hold a shared GPU's slot until the context is full. The request's limit is set to the
model's default when it has none, and lowered to the cap when it asks for more: clamped,
not refused, because the clients that do this cannot be told to ask for less. The body is
re-serialized only when it changes; models without limits cost one dict lookup.
"""

from __future__ import annotations

import json
from typing import Any

from hpc.specserving import TokenLimits

# The fields that bound a request's output, by path; the first is the one set when a
# request has none (OpenAI's chat API has two names, its Responses API a third; Anthropic's
# messages API uses max_tokens).
OUTPUT_LIMIT_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


def limit_output(path: str, payload: dict[str, Any], limits: TokenLimits) -> str | None:
    """Apply ``limits`` to ``payload`` in place; what was done (for the log line), or None.

    A limit that is not a positive integer is left for the engine to refuse.
    """
    fields = OUTPUT_LIMIT_FIELDS.get(path)
    if fields is None:
        return None
    cap = limits.max_tokens_cap
    asked = [name for name in fields if payload.get(name) is not None]
    if not asked:
        value = limits.max_tokens_default or cap
        if value is None:
            return None
        payload[fields[0]] = value
        return f"default {value}"
    done = None
    for name in asked:
        value = payload[name]
        if cap is not None and type(value) is int and value > cap:  # bool is no limit
            payload[name] = cap
            done = f"clamped {value} to {cap}"
    return done


def limited_body(
    path: str, payload: dict[str, Any], body: bytes, limits: TokenLimits | None
) -> tuple[bytes, str | None]:
    """The body to send (re-serialized if ``limits`` changed it) and what was done."""
    if limits is None:
        return body, None
    done = limit_output(path, payload, limits)
    if done is None:
        return body, None
    return json.dumps(payload).encode("utf-8"), done
