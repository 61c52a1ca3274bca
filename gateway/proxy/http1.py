"""The gateway's HTTP/1.1 client to its upstreams, on asyncio protocols.

Why not aiohttp's client, which the gateway used before: relaying a stream through it costs
a task wake-up per chunk (the parser feeds a ``StreamReader``; the handler's ``readany()``
is resumed through every frame of its await chain), and that, not the gateway's features,
was what made `mt gateway` slower than a bare aiohttp pass-through. Here an upstream's body
can be *pushed*: ``UpstreamConnection.push_to(sink)`` hands every decoded piece to
``sink.feed()`` inside ``data_received``, so the relay writes it to the client in the same
callback, with no task step (``make bench``: docs/benchmarks.md has the numbers).
Before that, in *pull* mode, the proxy awaits the status, the headers and the first event
with its clocks, exactly as before, and can still pass a replica over for the next one.

What it speaks: requests with a ``Content-Length`` body; responses with
``Transfer-Encoding: chunked``, ``Content-Length``, or a body to the connection's end;
keep-alive (``gateway.proxy.pool`` keeps the idle connections).
Not spoken, because no engine sends them: trailers, ``Expect: 100-continue``, HTTP/2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast

# What a pooled connection is for: scheme, host, port, and the TLS certificate digest it
# was checked against ("" when none is pinned). Connections to another job's front on the
# same host and port are never reused for this one.
PoolKey = tuple[str, str, int, str]
_MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class UpstreamError(Exception):
    """The upstream could not be reached, closed the connection, or did not speak HTTP/1.1."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be opened (refused, no route, name not found)."""


class UpstreamConnectTimeout(UpstreamUnreachable):
    """No connection to the upstream within the connect timeout."""


class UpstreamClosed(UpstreamError):
    """The upstream closed (or reset) the connection before the answer was whole."""


class UpstreamProtocolError(UpstreamError):
    """The upstream's bytes are not an HTTP/1.1 answer."""


class BodySink(Protocol):
    """Receives a pushed body: every piece as it arrives, then its end."""

    def feed(self, data: bytes) -> None:
        """The next piece of the body (never empty)."""

    def end(self, exc: BaseException | None) -> None:
        """The body ended: whole (``None``) or with ``exc``."""


# Where a connection is in its current exchange.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _TO_CLOSE = range(5)
# In _CHUNKED, what ``_left`` means when it is not a positive count of chunk bytes.
_SIZE_LINE, _CHUNK_END, _LAST = -1, -2, -3


@dataclass(frozen=True)
class Head:
    """The status and headers of an upstream's answer (header names in lower case)."""

    status: int
    headers: Mapping[str, str]

    @property
    def content_type(self) -> str:
        """The media type without parameters (``text/event-stream``), like aiohttp's."""
        return self.headers.get("content-type", "application/octet-stream").split(";")[0].strip()


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: PoolKey) -> None:
        self.key = key
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self.got_bytes = False  # any byte of the current answer: a retry is no longer safe
        self._state = _IDLE
        self._buf = b""
        self._left = 0
        self._head: asyncio.Future[Head] | None = None
        self._body: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: BaseException | None = None
        self._sink: BodySink | None = None

    # asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """A body that runs to the close ends here; any other exchange fails."""
        self.closed = True
        if self._state == _TO_CLOSE:
            self._end(None)
        elif self._state != _IDLE:
            reason = f" ({exc})" if exc else ""
            self._fail(UpstreamClosed(f"the upstream closed the connection{reason}"))

    def data_received(self, data: bytes) -> None:
        """Parse the head, then hand the body on (pushed or buffered)."""
        self.got_bytes = True
        if self._state == _HEAD:
            data = self._read_head(data)
            if not data:
                return
        if self._state == _CHUNKED:
            self._read_chunked(data)
        elif self._state == _LENGTH:
            take = data[: self._left] if len(data) > self._left else data
            self._left -= len(take)
            if take:
                self._deliver(take)
            if self._left == 0:
                self._end(None)
        elif self._state == _TO_CLOSE:
            self._deliver(data)
        # _IDLE: bytes nobody asked for (after a whole answer): the connection is not reused
        elif self._state == _IDLE:
            self.keep_alive = False

    # parsing ----------------------------------------------------------------------------
    def _read_head(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self._buf = buf
            if len(buf) > _MAX_HEAD_BYTES:
                self._fail(UpstreamProtocolError("the upstream's response head is over 64 KiB"))
            return b""
        self._buf = b""
        try:
            head = _parse_head(buf[:end])
        except ValueError as exc:
            self._fail(UpstreamProtocolError(f"the upstream's answer is not HTTP/1.1: {exc}"))
            return b""
        headers = head.headers
        if headers.get("connection", "").lower() == "close":
            self.keep_alive = False
        if head.status in _NO_BODY_STATUS or 100 <= head.status < 200:
            self._state, self._left = _LENGTH, 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._state, self._left = _CHUNKED, _SIZE_LINE
        elif "content-length" in headers:
            try:
                self._state, self._left = _LENGTH, int(headers["content-length"])
            except ValueError:
                self._fail(UpstreamProtocolError("the upstream sent a bad Content-Length"))
                return b""
        else:
            self._state, self.keep_alive = _TO_CLOSE, False
        if self._head is not None and not self._head.done():
            self._head.set_result(head)
        if self._state == _LENGTH and self._left == 0:
            self._end(None)
            return b""
        return buf[end + 4 :]

    def _read_chunked(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos, size = 0, len(buf)
        pieces: list[bytes] = []
        left = self._left
        while pos < size:
            if left > 0:
                piece = buf[pos : pos + left] if size - pos > left else buf[pos:]
                pieces.append(piece)
                pos += len(piece)
                left -= len(piece)
                if left == 0:
                    left = _CHUNK_END
            elif left == _CHUNK_END:
                if size - pos < 2:
                    break
                pos, left = pos + 2, _SIZE_LINE
            elif left == _SIZE_LINE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        self._fail(UpstreamProtocolError("the upstream sent a bad chunk size line"))
                        return
                    break
                try:
                    length = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self._fail(UpstreamProtocolError("the upstream sent a bad chunk size line"))
                    return
                pos = eol + 2
                left = length if length > 0 else _LAST
            else:  # _LAST: the empty line after the last chunk (trailers are not read)
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if eol == pos:
                    self._left = _LAST
                    if pieces:
                        self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                    if eol + 2 < size:
                        self.keep_alive = False  # bytes after the answer
                    self._end(None)
                    return
                pos = eol + 2  # a trailer line: skipped
        self._left = left
        self._buf = buf[pos:]
        if pieces:
            self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    # delivery ---------------------------------------------------------------------------
    def _deliver(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.feed(data)
            return
        self._body.append(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, exc: BaseException | None) -> None:
        if self._eof:
            return
        self._state = _IDLE
        self._eof = True
        self._exc = exc
        sink = self._sink
        if sink is not None:
            sink.end(exc)
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.keep_alive = False
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
            head.exception()  # retrieved: nobody may be awaiting it any more
        self._end(exc)
        if self.transport is not None:
            self.transport.close()

    # the exchange -----------------------------------------------------------------------
    def send(self, request: bytes) -> asyncio.Future[Head]:
        """Write ``request``; the future is the answer's head."""
        if self.transport is None or self._state != _IDLE:
            raise RuntimeError("an exchange is already under way on this connection")
        self._state, self._buf, self._left = _HEAD, b"", 0
        self._body, self._eof, self._exc, self._sink = [], False, None, None
        self.got_bytes = False
        self._head = self._loop.create_future()
        self.transport.write(request)
        return self._head

    async def read(self) -> bytes:
        """Pull mode: the body bytes that have arrived, waiting for some; ``b""`` at its end.

        Raises what ended the body otherwise (``UpstreamError``, or what ``set_exception``
        was given)."""
        while not self._body and not self._eof:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._body:
            data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body = []
            return data
        if self._exc is not None:
            raise self._exc
        return b""

    def push_to(self, sink: BodySink) -> None:
        """Push mode from now on: what is buffered, then every piece as it arrives."""
        pending, self._body = self._body, []
        self._sink = sink
        for piece in pending:
            sink.feed(piece)
        if self._eof:
            sink.end(self._exc)

    def set_exception(self, exc: BaseException) -> None:
        """End the body with ``exc`` from outside (a clock ran out, the gateway shuts
        down); the connection is not reused."""
        if not self._eof:
            self._fail(exc)

    def exception(self) -> BaseException | None:
        """What ended the body, if it failed."""
        return self._exc

    def at_eof(self) -> bool:
        """True once the body has ended, whole or not."""
        return self._eof

    def pause_reading(self) -> None:
        """Stop reading from the upstream (the client is slow): TCP pushes back."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the upstream again."""
        if self.transport is not None and not self.closed and not self.transport.is_reading():
            self.transport.resume_reading()

    @property
    def reusable(self) -> bool:
        """Whole answer read, keep-alive, still open."""
        return self._state == _IDLE and self._eof and self.keep_alive and not self.closed

    def close(self) -> None:
        """Close the connection."""
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> Head:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"status line {lines[0][:80]!r}")
    try:
        status = int(rest[:3])
    except ValueError:
        raise ValueError(f"status line {lines[0][:80]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return Head(status, headers)


def request_bytes(
    method: str, path: str, host: str, headers: Mapping[str, str], body: bytes
) -> bytes:
    """An HTTP/1.1 request with a ``Content-Length`` body (header values must not hold
    CR or LF: the caller's values come from config and the gateway, never raw)."""
    lines = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    return "".join(lines).encode("latin-1") + body
