"""The typed keys under which the app and each request keep their state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.reload import Live


@dataclass
class RequestInfo:
    """What one request's log line says beyond method, path and status; handlers fill it."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    client: str | None = None
    model: str | None = None
    upstream: str | None = None
    outcome: str | None = None


CONFIG = web.AppKey("config", GatewayConfig)
LIVE = web.AppKey("live", Live)
SESSION = web.AppKey("session", aiohttp.ClientSession)
REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
