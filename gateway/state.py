"""The typed keys under which the app and each request keep their state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.admission import Admission
from gateway.balancer import Balancer
from gateway.config import GatewayConfig
from gateway.connections import Connections
from gateway.inflight import Inflight
from gateway.keys import Client
from gateway.metrics import Metrics
from gateway.ratelimit import Limiter
from gateway.reload import Live


@dataclass
class RequestInfo:
    """What one request's log line says beyond method, path and status; handlers fill it.

    Log fields only: the key the auth middleware found is ``CLIENT``, the rate-limit headers
    a response echoes are ``RATELIMIT_HEADERS``, and the proxy's working state is its own
    ``Exchange``.
    """

    request_id: str
    started: float = field(default_factory=time.monotonic)
    client: str | None = None
    model: str | None = None  # as the client asked (perhaps an alias)
    served_model: str | None = None  # the model that answers (itself, or a fallback)
    upstream: str | None = None
    outcome: str | None = None
    routed: bool = False  # the model is one the gateway knows (bounds metric labels)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False  # charged by estimate: the engine sent no usage
    output_limit: str | None = None  # the model's max_tokens default or cap, if applied
    delivered: bool = False  # a stream's last event reached the client before it closed


CONFIG = web.AppKey("config", GatewayConfig)
LIVE = web.AppKey("live", Live)
LIMITER = web.AppKey("limiter", Limiter)
METRICS = web.AppKey("metrics", Metrics)
BALANCER = web.AppKey("balancer", Balancer)
ADMISSION = web.AppKey("admission", Admission)
CONNECTIONS = web.AppKey("connections", Connections)
INFLIGHT = web.AppKey("inflight", Inflight)
REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
CLIENT = web.RequestKey("client", Client)  # the key the auth middleware found (with keys on)
# X-RateLimit-* of the client's buckets, echoed on the response (with limits on).
RATELIMIT_HEADERS = web.RequestKey("ratelimit_headers", dict)
