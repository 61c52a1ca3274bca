"""Which models a request's key sees in ``GET /v1/models`` (and may look up one by one).

The rows and their states are ``hpc.catalog.listing``'s, the function `mt models` uses too;
here they are narrowed to what the key may use (its allow-list matches the name, or the
model an alias stands for, as for requests) and to what a request would be answered for.
"""

from __future__ import annotations

from aiohttp import web

from gateway.ondemand.wait import ON_DEMAND
from gateway.state import CLIENT, LIVE
from hpc.catalog import Listed, listing


def visible_models(request: web.Request) -> list[Listed]:
    """The models the request's key may use and that answer now or start on request,
    sorted by name."""
    controller = request.app[ON_DEMAND]
    client = request.get(CLIENT)
    rows = listing(
        request.app[LIVE].snapshot.routes.catalog,
        controller.last_starts(),
        starts_jobs=controller.backend is not None,
    )
    return sorted(
        (
            row
            for row in rows
            if row.usable
            and (
                client is None
                or client.allows(row.model.name)
                or (row.model.alias_of is not None and client.allows(row.model.alias_of))
            )
        ),
        key=lambda row: row.model.name,
    )
