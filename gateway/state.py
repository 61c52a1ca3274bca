"""The typed keys under which the app and each request keep their state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.admission import Admission
from gateway.balancer import Balancer
from gateway.config import GatewayConfig
from gateway.inflight import Inflight
from gateway.keys import Client
from gateway.metrics import Metrics
from gateway.ratelimit import KeyBuckets, Limiter
from gateway.reload import Live


@dataclass
class RequestInfo:
    """What one request's log line says beyond method, path and status; handlers fill it."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    client: str | None = None
    client_entry: Client | None = None
    model: str | None = None  # as the client asked (perhaps an alias)
    served_model: str | None = None  # the model that answers (itself, or a fallback)
    upstream: str | None = None
    outcome: str | None = None
    routed: bool = False  # the model is one the gateway knows (bounds metric labels)
    buckets: KeyBuckets | None = None  # the client's rate-limit buckets, if it has limits
    ratelimit_headers: dict[str, str] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    committed: bool = False  # a stream's 200 is out: the answer can no longer change
    tokens_estimated: bool = False  # charged by estimate: the usage never came
    # For the estimate of a stream cut or abandoned before its usage event.
    payload: dict[str, Any] | None = field(default=None, repr=False)
    events_relayed: int = 0
    # time.monotonic() (the loop's clock) of the steps the timing histograms measure.
    sent_at: float | None = None  # sent to the replica that answered
    upstream_first_at: float | None = None  # its first body byte (non-streaming: its body)
    client_first_at: float | None = None  # the first body byte written to the client


CONFIG = web.AppKey("config", GatewayConfig)
LIVE = web.AppKey("live", Live)
SESSION = web.AppKey("session", aiohttp.ClientSession)
LIMITER = web.AppKey("limiter", Limiter)
METRICS = web.AppKey("metrics", Metrics)
BALANCER = web.AppKey("balancer", Balancer)
ADMISSION = web.AppKey("admission", Admission)
INFLIGHT = web.AppKey("inflight", Inflight)
REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
