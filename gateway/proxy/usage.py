"""Token accounting: ``include_usage`` forced on for streams, usage found, tokens charged.

A stream is sent upstream with ``stream_options.include_usage`` forced on (the body is
re-serialized for that); the one event carrying ``"usage": {…}`` (found with a bytes
search, then parsed alone) is counted, and dropped again if the client did not ask for it.
A JSON answer's ``usage`` is found from its end and parsed alone too.

Some engines send no usage event at all (llama-cpp-python's server). When the client asked
for one (``include_usage``) and the replica is not known to send it (``UsageSenders``), the
relay counts the events that carry text (``content_events``: one token each, as engines
stream them), holds back ``data: [DONE]``, and sends a usage event of its own before it
(``usage_event``): completion tokens counted, prompt tokens estimated. Such a request is
charged and logged as estimated (``tokens_estimated``, ``mt_gateway_estimated_tokens_total``).
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from gateway.metrics import Metrics
from gateway.proxy.exchange import Exchange
from gateway.state import RequestInfo

# A "usage" key with an object value; a string "usage" in content cannot be followed by ":{".
USAGE_MARKS = (b'"usage":{', b'"usage": {')
# Keys whose non-empty string value is a generated token in a stream's event: chat deltas
# (text, reasoning, tool-call arguments) and completions' text. A quote inside a JSON string
# is escaped, so a key found this way is a key, never part of a text.
_TEXT_KEYS = (b'"content":', b'"text":', b'"reasoning_content":', b'"reasoning":', b'"arguments":')
_STREAM_ID = re.compile(rb'"id": ?"([A-Za-z0-9._:-]{1,128})"')
# Replicas remembered as senders of a usage event (record keys): far more than live at once.
_SENDERS_KEPT = 1024
_decoder = json.JSONDecoder()


class UsageSenders:
    """The replicas that sent a usage event when asked: their streams need no counting.

    Learned from every stream (the gateway always asks); bounded, oldest forgotten first.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()

    def sends(self, source: str) -> bool:
        """True if ``source`` sent a usage event before."""
        return source in self._seen

    def note(self, source: str) -> None:
        """``source`` sent a usage event."""
        if source not in self._seen:
            self._seen[source] = None
            while len(self._seen) > _SENDERS_KEPT:
                self._seen.popitem(last=False)


USAGE_SENDERS = web.AppKey("usage_senders", UsageSenders)


def client_wants_usage(payload: dict[str, Any]) -> bool:
    """True if the request asked for a usage event (``stream_options.include_usage``)."""
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def content_events(chunk: bytes) -> int:
    """How many of the SSE events in ``chunk`` carry generated text (a token each)."""
    count = 0
    for event in chunk.split(b"\n\n"):
        if _has_text(event):
            count += 1
    return count


def _has_text(event: bytes) -> bool:
    for key in _TEXT_KEYS:
        at = event.find(key)
        while at >= 0:
            value = event[at + len(key) : at + len(key) + 3].lstrip()
            if value.startswith(b'"') and not value.startswith(b'""'):
                return True
            at = event.find(key, at + 1)
    return False


def stream_id(first: bytes) -> str | None:
    """The ``id`` of a stream's first event, for the usage event the gateway adds."""
    found = _STREAM_ID.search(first)
    return found.group(1).decode("ascii") if found else None


def usage_event(exchange: Exchange, counted: int, chunk_id: str | None) -> bytes:
    """The usage event the engine did not send: ``counted`` completion tokens, the prompt
    estimated; noted in the exchange as estimated. OpenAI's shape: ``"choices": []``."""
    prompt = exchange.prompt_tokens
    if prompt is None:
        prompt = prompt_estimate(exchange.payload)
    exchange.prompt_tokens, exchange.completion_tokens = prompt, counted
    exchange.usage_estimated = True
    payload = exchange.payload
    chat = isinstance(payload.get("messages"), list)
    chunk: dict[str, Any] = {
        "id": chunk_id or "mt-usage",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": payload.get("model"),
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": counted,
            "total_tokens": prompt + counted,
        },
    }
    return b"data: " + json.dumps(chunk).encode("utf-8") + b"\n\n"


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
    seen, else :func:`prompt_estimate`), marked ``estimated`` in the log line; so is a
    stream whose usage event the gateway made itself (``usage_event``).
    """
    prompt, completion = exchange.prompt_tokens, exchange.completion_tokens
    model = info.served_model or "-"
    estimated = exchange.usage_estimated
    if stream and completion is None and exchange.events_relayed:
        completion = exchange.events_relayed
        if prompt is None:
            prompt = prompt_estimate(exchange.payload)
        estimated = True
    if estimated:
        info.tokens_estimated = True
        metrics.estimated_tokens[(model, "prompt")] += prompt or 0
        metrics.estimated_tokens[(model, "completion")] += completion or 0
    if prompt is None and completion is None:
        return
    info.prompt_tokens, info.completion_tokens = prompt, completion
    metrics.count_tokens(model, prompt, completion)
    if exchange.buckets is not None:
        exchange.buckets.spend_tokens((prompt or 0) + (completion or 0))


def prompt_estimate(payload: dict[str, Any] | None) -> int:
    """The prompt's tokens, estimated: a quarter of its characters (English text averages
    about four characters a token)."""
    return _prompt_chars(payload) // 4


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
