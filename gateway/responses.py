"""Which replica holds which stored response: the Responses API's sticky routing.

An engine keeps a response it answered (vLLM with ``store``) in its own memory; a follow-up
that names it (``previous_response_id``) must reach that same replica, or the engine
answers that it does not know it. The gateway remembers, for each response it relayed, the
replica (its source) and the client key that asked; a follow-up goes to that replica only.

Bounded: the most recently used :data:`MAX_RESPONSES` ids are kept (an LRU), about 200
bytes each; an id it has forgotten (or from before a gateway restart) is routed like any
request. A follow-up from another key, or whose replica is gone, is refused
(``previous_response_not_found``): another key must not reach someone else's conversation
by its id, and no other replica holds it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

MAX_RESPONSES = 100_000
# An id longer than this is no engine's: not remembered.
_MAX_ID_CHARS = 200


@dataclass(frozen=True, slots=True)
class Home:
    """Where a response lives: the replica's source, and the client key that asked."""

    source: str
    client: str | None


class ResponseHomes:
    """Response id → :class:`Home`, the least recently used forgotten past ``limit``."""

    def __init__(self, limit: int = MAX_RESPONSES) -> None:
        self._limit = limit
        self._homes: OrderedDict[str, Home] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def remember(self, response_id: str, home: Home) -> None:
        """Note where ``response_id`` lives."""
        if not response_id or len(response_id) > _MAX_ID_CHARS:
            return
        self._homes[response_id] = home
        self._homes.move_to_end(response_id)
        while len(self._homes) > self._limit:
            self._homes.popitem(last=False)

    def find(self, response_id: str) -> Home | None:
        """Where ``response_id`` lives, if remembered."""
        home = self._homes.get(response_id)
        if home is not None:
            self._homes.move_to_end(response_id)
        return home


def response_id(body: bytes, *, stream: bool) -> str | None:
    """The id of a Responses answer: a JSON body's ``id``, or, for a stream, the id of the
    ``response`` in its first event (``response.created``)."""
    if stream:
        for line in body.split(b"\n"):
            if line.startswith(b"data:"):
                body = line[len(b"data:") :]
                break
        else:
            return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if stream:
        payload = payload.get("response")
        if not isinstance(payload, dict):
            return None
    found = payload.get("id")
    return found if isinstance(found, str) else None


RESPONSE_HOMES = web.AppKey("response_homes", ResponseHomes)
