"""The model-routed APIs the gateway forwards, and how each differs on the wire.

Every one is routed by the ``model`` of its body to the same replicas, with the same keys,
limits and failover (``handler``); what differs is said here, once per route, so the hot
path reads an attribute instead of comparing paths:

- where the engine serves it: under its OpenAI root (``/v1/...``) or at its root
  (llama-server's and vLLM's ``/tokenize``, ``/detokenize``);
- how a whole stream ends: OpenAI's chat and completions with ``data: [DONE]``, Anthropic's
  Messages with ``message_stop``; the Responses API's last event is ``response.completed``
  holding the whole response, so there a clean end of the HTTP body is what says whole;
- the error shape (OpenAI's, or Anthropic's on ``/v1/messages``: ``gateway.anthropic``);
- whether a stream's usage is forced on (``stream_options`` is chat's and completions');
- the body: JSON, or ``multipart/form-data`` with ``model`` as a form field (audio);
- which of the client's headers go on (``anthropic-version``, ``anthropic-beta``), and
  whether the query string does (``?beta=true``: the Anthropic SDK's); the key never does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gateway.anthropic import anthropic_event, is_anthropic
from gateway.proxy.sse import ends_done
from hpc.openai import API_PREFIX, SERVER_ERROR, error_body, error_event

# Codes of a failed stream that are 502s (the others: 504 for a clock, 503 for the rest).
_BROKEN = frozenset({"", "upstream_error", "internal_error"})
# The end of a whole Messages stream: its last event's type.
_MESSAGE_STOP = b"message_stop"


@dataclass(frozen=True, slots=True)
class Api:
    """One model-routed route of the gateway and its wire differences (see the module doc)."""

    path: str
    stream_end: bytes | None = b"[DONE]"  # in a whole stream's tail; None: a clean end
    force_usage: bool = False
    multipart: bool = False
    sticky: bool = False  # previous_response_id pins the replica (gateway.responses)
    keep_query: bool = False
    headers: tuple[str, ...] = ()  # the client's headers passed on, by lower-case name
    # Events after which a client may close at once, its answer whole (Codex does, on the
    # Responses API's last event, before the engine's body has ended): see ``delivered``.
    last_events: tuple[bytes, ...] = ()

    # Worked out once, when the table is made: the hot path reads them as attributes.
    anthropic: bool = field(init=False)  # errors in Anthropic's shape
    at_root: bool = field(init=False)  # served at the engine's root, not under /v1
    suffix: str = field(init=False)  # the path after the engine's OpenAI root (or its root)
    passes_headers: bool = field(init=False)  # some of the client's headers go on

    def __post_init__(self) -> None:
        at_root = not self.path.startswith(API_PREFIX + "/")
        object.__setattr__(self, "anthropic", is_anthropic(self.path))
        object.__setattr__(self, "at_root", at_root)
        object.__setattr__(self, "suffix", self.path if at_root else self.path[len(API_PREFIX) :])
        object.__setattr__(self, "passes_headers", bool(self.headers) or self.multipart)

    def whole(self, tail: bytes) -> bool:
        """True if a stream whose last bytes are ``tail`` said it is whole (or needs not)."""
        if self.stream_end is None:
            return True
        if self.stream_end == b"[DONE]":
            return ends_done(tail)
        return self.stream_end in tail

    def delivered(self, chunk: bytes) -> bool:
        """True if ``chunk`` (whole events, as relayed) holds this API's last event."""
        return any(event in chunk for event in self.last_events)

    def end_event(self, body: bytes) -> bytes:
        """The in-band event that ends a stream already open with the error ``body`` (an
        OpenAI error object: the answer the client would have had before its 200)."""
        if not self.anthropic:
            return error_event(body)
        try:
            error = json.loads(body)["error"]
            message, code = str(error["message"]), str(error.get("code") or "")
        except (ValueError, KeyError, TypeError):
            message, code = body[:500].decode("utf-8", "replace"), ""
        return self.error_event(message, code)

    def error_event(self, message: str, code: str) -> bytes:
        """The in-band event that ends a failed stream, in this API's shape."""
        if self.anthropic:
            # The status the error would have had before the 200 (its Anthropic type).
            status = 503
            if code.endswith("_timeout"):
                status = 504
            elif code in _BROKEN:
                status = 502
            return anthropic_event(status, message)
        return error_event(error_body(message, SERVER_ERROR, code))


_OPENAI = (
    Api("/v1/chat/completions", force_usage=True),
    Api("/v1/completions", force_usage=True),
    Api("/v1/embeddings"),
)
_ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
# The Responses API's terminal events, by their SSE ``event:`` line (vLLM and llama-server
# send one before each ``data:``).
_RESPONSE_ENDS = (
    b"event: response.completed",
    b"event: response.incomplete",
    b"event: response.failed",
)
_AGENTS = (
    Api("/v1/responses", stream_end=None, sticky=True, keep_query=True, last_events=_RESPONSE_ENDS),
    Api("/v1/messages", stream_end=_MESSAGE_STOP, keep_query=True, headers=_ANTHROPIC_HEADERS),
    Api("/v1/messages/count_tokens", keep_query=True, headers=_ANTHROPIC_HEADERS),
)
# The engines' other model endpoints, where they serve them (vLLM, llama-server).
_ENGINE = (
    Api("/tokenize"),
    Api("/detokenize"),
    Api("/v1/rerank"),
    Api("/v1/score"),
    Api("/v1/audio/transcriptions", stream_end=None, multipart=True),
)
# Every POST route the gateway routes by model, in the order they are registered.
APIS: tuple[Api, ...] = (*_OPENAI, *_AGENTS, *_ENGINE)
CHAT = _OPENAI[0]
