"""One proxied request's working state on the hot path (what its log line says is RequestInfo).

The handler makes one per request and hands it down the forward, the relay and the token
charge; nothing outside ``gateway.proxy`` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.proxy.apis import CHAT, Api
from gateway.proxy.form import Form
from gateway.ratelimit import Spender


@dataclass(slots=True)
class Exchange:
    """The request's body, its key's buckets, its stream once open, and what came back."""

    payload: dict[str, Any]  # the parsed body, for the estimate of a cut stream's prompt
    api: Api = CHAT  # the route's wire differences
    form: Form | None = None  # a multipart body's fields (the audio endpoints)
    first: bytes | None = None  # a stream's first event, kept where the API is sticky
    buckets: Spender | None = None  # the client's rate-limit buckets, if it has limits
    # The client's stream once its 200 is out (an on-demand wait may open it with
    # keep-alives before any upstream answers): from then on the answer cannot change.
    out: web.StreamResponse | None = None
    events_relayed: int = 0
    prompt_tokens: int | None = None  # as the upstream reported them
    completion_tokens: int | None = None
    # The client asked for a usage event (``stream_options.include_usage``).
    wants_usage: bool = False
    # The counts are the gateway's own (proxy.usage.usage_event): the engine sent none.
    usage_estimated: bool = False
    # time.monotonic() (the loop's clock) of the steps the timing histograms measure.
    sent_at: float | None = None  # sent to the replica that answered
    upstream_first_at: float | None = None  # its first body byte (non-streaming: its body)
    client_first_at: float | None = None  # the first body byte written to the client
