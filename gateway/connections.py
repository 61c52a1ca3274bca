"""Caps on open client connections: for the whole gateway and per client address.

Admission (``admission.py``) bounds the requests being answered; this bounds the sockets
clients hold open, idle keep-alive ones and ones still sending their headers included, so
that clients that open connections and send nothing cannot use up the gateway's open files.
A connection past a cap is answered 503 at once and closed (``protocol.py``); it never
reaches the request path and takes no place in admission.

Loopback addresses have no per-client cap, only the total: on a login node every user's
SSH tunnel (``ssh -L``) reaches the gateway from 127.0.0.1, as does a reverse proxy on the
same host, so one loopback address stands for many people and a cap on it would be a second,
smaller total. Counting is a few dict updates per connection: no locks (one event loop).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

# What the cap that is full is called, in refusals and in the metric's label.
TOTAL = "total"
CLIENT = "client"


@lru_cache(maxsize=1024)
def is_loopback_address(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


class Connections:
    """The client connections open now, checked against the caps (None: no cap)."""

    __slots__ = ("_max_per_client", "_max_total", "_per_client", "lingering", "refused", "total")

    def __init__(self, max_total: int | None, max_per_client: int | None) -> None:
        self._max_total = max_total
        self._max_per_client = max_per_client
        self._per_client: dict[str, int] = {}
        self.total = 0
        self.refused = {TOTAL: 0, CLIENT: 0}
        self.lingering = 0  # refused connections still reading what their clients send

    def open(self, host: str) -> str | None:
        """Count a new connection from ``host``: None if it may stay, else which cap is full
        (``total`` or ``client``). An accepted connection must ``close`` exactly once."""
        if self._max_total is not None and self.total >= self._max_total:
            self.refused[TOTAL] += 1
            return TOTAL
        if self._max_per_client is not None and not is_loopback_address(host):
            count = self._per_client.get(host, 0)
            if count >= self._max_per_client:
                self.refused[CLIENT] += 1
                return CLIENT
            self._per_client[host] = count + 1
        self.total += 1
        return None

    def close(self, host: str) -> None:
        """An accepted connection from ``host`` has ended; an address with none is forgotten."""
        self.total -= 1
        count = self._per_client.get(host)
        if count is None:
            return  # loopback, or no per-client cap: never counted per address
        if count > 1:
            self._per_client[host] = count - 1
        else:
            del self._per_client[host]
