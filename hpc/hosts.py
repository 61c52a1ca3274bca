"""Host addresses: which ones bind every interface (and so name no host a client can reach),
and the name a job advertises for its node.

Its own module, below hpc.site, because the code that runs in a job (hpc.job) needs it and
must not import the site's settings (which import hpc.k8s's, which renders pool plans).
"""

from __future__ import annotations

import socket

# Addresses that bind every interface: no client can connect to them by that name.
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared, never bound


def is_wildcard(host: str) -> bool:
    """True for an address that binds every interface (``0.0.0.0``, ``::``, empty)."""
    return host in WILDCARD_HOSTS


def advertised_host(engine_host: str) -> str:
    """The host other machines use to reach an engine bound to ``engine_host``."""
    if is_wildcard(engine_host):
        return socket.gethostname()
    return engine_host
