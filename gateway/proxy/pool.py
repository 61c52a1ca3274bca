"""Keep-alive connections to the upstreams, and where each upstream's base URL points.

One ``Pool`` per gateway (``UPSTREAMS``): no limit on connections, since every
client request holds one for as long as it streams and a limit would queue streams behind
each other; an idle connection is reused by the next request to the same upstream.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from gateway.proxy.http1 import (
    Head,
    PoolKey,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamConnectTimeout,
    UpstreamUnreachable,
)
from hpc.tlspin import PinMismatch, pinned_context

if sys.version_info >= (3, 11):
    from asyncio import timeout as _timeout
else:  # aiohttp itself depends on async-timeout before Python 3.11
    from async_timeout import timeout as _timeout  # type: ignore[import-not-found,unused-ignore]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an upstream's base URL points: what to connect to and what to send."""

    scheme: str
    host: str
    port: int
    path: str  # the base URL's path without its trailing slash ("/v1")
    host_header: str
    pin: str = ""  # the job front's certificate SHA-256 (hpc.tlspin); "": none


@functools.lru_cache(maxsize=4096)
def endpoint(base_url: str, pin: str | None = None) -> Endpoint:
    """``base_url`` parsed once (the routes hold a few; requests reuse them); ``pin``: the
    certificate digest a job's record names (the connection is refused to any other).

    Raises UpstreamUnreachable for a URL that is not http(s)://host[:port]/path."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamUnreachable(f"not an http(s) URL: {base_url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UpstreamUnreachable(f"bad port in {base_url!r}") from exc
    host_header = parts.netloc.rpartition("@")[2]
    if pin and parts.scheme != "https":
        raise UpstreamUnreachable(f"a pinned certificate needs an https URL: {base_url!r}")
    path = parts.path.rstrip("/")
    return Endpoint(parts.scheme, parts.hostname, port, path, host_header, pin or "")


@dataclass
class Pool:
    """Keep-alive connections per upstream (scheme, host, port): idle ones are reused."""

    connect_timeout_s: float
    ssl_context: ssl.SSLContext | None = None
    _idle: dict[PoolKey, list[UpstreamConnection]] = field(default_factory=dict)
    _open: set[UpstreamConnection] = field(default_factory=set)

    async def request(self, target: Endpoint, data: bytes) -> tuple[UpstreamConnection, Head]:
        """Send ``data`` and wait for the answer's head.

        A connection closed before any byte of the answer came (a pooled keep-alive
        connection the engine closed just as it was reused, say) is tried once more on a
        fresh one. Raises UpstreamError (a subclass says what failed); on any failure, and
        on cancellation (the caller's clock), the connection is closed.
        """
        for tries_left in (1, 0):
            conn, _ = await self.connect(target.scheme, target.host, target.port, target.pin)
            try:
                head = await conn.send(data)
            except UpstreamClosed:
                self.discard(conn)
                if tries_left and not conn.got_bytes:
                    continue
                raise
            except BaseException:
                self.discard(conn)
                raise
            return conn, head
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def connect(
        self, scheme: str, host: str, port: int, pin: str = ""
    ) -> tuple[UpstreamConnection, bool]:
        """An open connection (reused when one is idle) and whether it was reused.

        With a ``pin``, the server's certificate is checked against it right after the
        handshake, before anything is sent (hpc.tlspin). Raises UpstreamConnectTimeout or
        UpstreamError (UpstreamUnreachable for a certificate that is not the pinned one)."""
        key = (scheme, host, port, pin)
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn, True
            self._open.discard(conn)
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if pin:
            tls = pinned_context(pin)  # the handshake fails unless it is the job's certificate
        elif scheme == "https":
            if self.ssl_context is None:
                self.ssl_context = ssl.create_default_context()
            tls = self.ssl_context
        try:
            async with _timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, key), host, port, ssl=tls
                )
        except TimeoutError as exc:
            raise UpstreamConnectTimeout(
                f"no connection within {self.connect_timeout_s:g} s"
            ) from exc
        except PinMismatch as exc:
            raise UpstreamUnreachable(exc.message) from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect ({exc.strerror or exc})") from exc
        self._open.add(conn)
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Done with ``conn``: kept for the next request if it can be, else closed."""
        if conn.reusable:
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            self.discard(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Close ``conn`` and forget it (a failed or cut exchange)."""
        conn.close()
        self._open.discard(conn)

    def close(self) -> None:
        """Close every connection (the gateway stops)."""
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()


# The gateway's one pool, made in ``gateway.app``'s cleanup context.
UPSTREAMS = web.AppKey("upstreams", Pool)
