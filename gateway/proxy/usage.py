"""Token accounting: ``include_usage`` forced on for streams, usage found, tokens charged.

A stream is sent upstream with ``stream_options.include_usage`` forced on (the body is
re-serialized for that); the one event carrying ``"usage": {…}`` (found with a bytes
search, then parsed alone) is counted, and dropped again if the client did not ask for it.
A JSON answer's ``usage`` is found from its end and parsed alone too.
"""

from __future__ import annotations

import json
from typing import Any

from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.state import RequestInfo

# A "usage" key with an object value; a string "usage" in content cannot be followed by ":{".
USAGE_MARKS = (b'"usage":{', b'"usage": {')
_decoder = json.JSONDecoder()


def with_usage(payload: dict[str, Any], body: bytes) -> tuple[bytes, bool]:
    """The body with ``stream_options.include_usage`` on; True if the client had it off."""
    options = payload.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict):
        return body, False  # the engine will say what is wrong with it
    if options.get("include_usage") is True:
        return body, False
    payload["stream_options"] = {**options, "include_usage": True}
    return json.dumps(payload).encode("utf-8"), True


def read_usage(data: bytes, at: int) -> dict[str, Any] | None:
    """The JSON object after the ``"usage"`` key starting at ``at``, or None."""
    colon = data.find(b":", at)
    if colon < 0:
        return None
    try:
        value, _ = _decoder.raw_decode(data[colon + 1 :].decode("utf-8", "replace").lstrip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def note_usage(exchange: Exchange, usage: dict[str, Any]) -> None:
    """Keep the token counts of an upstream's ``usage`` object."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int):
        exchange.prompt_tokens = prompt
    if isinstance(completion, int):
        exchange.completion_tokens = completion


def take_usage(events: bytes, strip: bool, exchange: Exchange) -> bytes:
    """Note the usage in ``events`` (whole SSE events); drop its event if ``strip`` and it
    carries nothing else (``"choices": []``, as OpenAI's usage chunk does)."""
    at = events.find(USAGE_MARKS[0])
    if at < 0:
        at = events.find(USAGE_MARKS[1])
    start = events.rfind(b"\n\n", 0, at)
    start = 0 if start < 0 else start + 2
    end = events.find(b"\n\n", at)
    end = len(events) if end < 0 else end + 2
    event = events[start:end]
    data = event.strip()
    if not data.startswith(b"data:"):
        return events
    try:
        chunk = json.loads(data[len(b"data:") :])
    except ValueError:
        return events
    if not isinstance(chunk, dict) or not isinstance(chunk.get("usage"), dict):
        return events
    note_usage(exchange, chunk["usage"])
    if strip and not chunk.get("choices"):
        return events[:start] + events[end:]
    return events


def charge(metrics: Metrics, info: RequestInfo, exchange: Exchange, *, stream: bool) -> None:
    """Count the request's tokens in the metrics and its key's token bucket.

    A stream cut or abandoned before its usage event still used the engine: it is charged
    an estimate (completion: the events relayed; prompt: the upstream's count if one was
    seen, else a quarter of the prompt's characters), marked ``estimated`` in the log line.
    """
    prompt, completion = exchange.prompt_tokens, exchange.completion_tokens
    model = info.served_model or "-"
    if stream and completion is None and exchange.events_relayed:
        completion = exchange.events_relayed
        if prompt is None:
            prompt = _prompt_chars(exchange.payload) // 4
        info.tokens_estimated = True
        metrics.estimated_tokens[(model, "prompt")] += prompt
        metrics.estimated_tokens[(model, "completion")] += completion
    if prompt is None and completion is None:
        return
    info.prompt_tokens, info.completion_tokens = prompt, completion
    metrics.count_tokens(model, prompt, completion)
    if exchange.buckets is not None:
        exchange.buckets.spend_tokens((prompt or 0) + (completion or 0))


def _prompt_chars(payload: dict[str, Any] | None) -> int:
    """Characters of the prompt: ``prompt`` (text or list of texts) or the messages' text."""
    if payload is None:
        return 0
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        return sum(len(p) for p in prompt if isinstance(p, str))
    total = 0
    messages = payload.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):  # parts: {"type": "text", "text": …}
            total += sum(
                len(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    return total
