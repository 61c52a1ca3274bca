"""Sticky routing for the Responses API, on the request's side: which replica a follow-up
must reach, and noting which replica made each response (the store is ``gateway.responses``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import openai_error
from gateway.keys import Client
from gateway.proxy.exchange import Exchange
from gateway.responses import RESPONSE_HOMES, Home, response_id
from gateway.routes import Upstream
from gateway.state import LIVE
from hpc.openai import INVALID_REQUEST


def pinned_replica(
    request: web.Request, payload: dict[str, Any], model: str, client: Client | None
) -> Upstream | web.Response | None:
    """The replica that holds the ``previous_response_id`` a follow-up names: None if the
    gateway does not know the id (routed like any request), or the 400 that refuses it."""
    previous = payload.get("previous_response_id")
    if not isinstance(previous, str):
        return None
    home = request.app[RESPONSE_HOMES].find(previous)
    if home is None:
        return None
    owner = client.name if client is not None else None
    if home.client == owner:
        for upstream in request.app[LIVE].snapshot.routes.upstreams(model):
            if upstream.source == home.source:
                return upstream
        reason = "the replica that holds it no longer serves this model"
    else:
        reason = "it was not made with this key"
    return openai_error(
        400,
        f"previous response {previous[:200]!r} cannot be continued here: {reason}; "
        "start a new conversation (send the whole input)",
        INVALID_REQUEST,
        "previous_response_not_found",
        param="previous_response_id",
    )


def remember(
    request: web.Request,
    response: web.StreamResponse,
    exchange: Exchange,
    stream: bool,
    source: str,
    client: Client | None,
) -> None:
    """Note which replica holds the response just relayed (its id from the answer)."""
    if stream:
        data = exchange.first
    elif isinstance(response, web.Response) and response.status == 200:
        data = response.body if isinstance(response.body, bytes) else None
    else:
        data = None
    found = response_id(data, stream=stream) if data else None
    if found is not None:
        home = Home(source, client.name if client is not None else None)
        request.app[RESPONSE_HOMES].remember(found, home)
