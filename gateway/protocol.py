"""The gateway's side of each client connection, below the app: connection caps, and
OpenAI-shaped answers to requests aiohttp cannot parse.

aiohttp makes one ``RequestHandler`` per connection and answers what it cannot parse (a
16 KiB header, ``Content-Length`` with ``Transfer-Encoding``, a bad request line) from
``RequestHandler.handle_error``, in plain text, before any middleware runs.
``ConnectionHandler`` overrides that answer, ends a body whose chunked encoding breaks
mid-request with the parse error (so ``error_middleware`` answers 400 at once), and counts
its connection in ``Connections`` from ``connection_made`` to ``connection_lost``.
``GatewayRunner`` is ``web.AppRunner`` with the one change that its server makes these
handlers; aiohttp offers no public setting for the handler class, so the runner overrides
``_make_server``, the hook its own two runners use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.web_request import BaseRequest

from gateway.connections import Connections
from gateway.errors import connection_refused, parse_reason, protocol_error, reply_response
from gateway.logs import LOGGER_NAME, fields
from hpc.openai import ErrorReply

log = logging.getLogger(f"{LOGGER_NAME}.protocol")

# A refused connection's answer is written, then what the client still sends is read and
# dropped this long before the socket is closed: closing with unread data resets the
# connection, and a reset can destroy the answer before the client reads it (aiohttp does
# the same, for up to 10 s, after a response that leaves a body unread).
REFUSED_LINGER_S = 2.0
# At most this many refused connections linger at once; beyond, they are closed at once, so
# a flood of connections cannot hold open files through the lingering either.
MAX_LINGERING = 256


def raw_response(reply: ErrorReply) -> bytes:
    """A whole HTTP/1.1 response with ``Connection: close``, for a connection that gets no
    request handling at all."""
    body = reply.body()
    head = [
        f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if reply.retry_after:
        head.append(f"Retry-After: {reply.retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


class _Refused(asyncio.Protocol):
    """A refused connection after its answer: reads and drops what arrives until the client
    closes its side or ``REFUSED_LINGER_S`` is up, then closes."""

    def __init__(self, connections: Connections, transport: asyncio.Transport) -> None:
        self._caps = connections
        connections.lingering += 1
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        """Dropped: the request is not handled."""

    def eof_received(self) -> bool:
        """The client is done: returning False closes the transport."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the timer; the linger is over."""
        self._timer.cancel()
        self._caps.lingering -= 1


class ConnectionHandler(web.RequestHandler):
    """One client connection: counted against the caps, refused with 503 past them, and
    given an OpenAI-shaped error for a request aiohttp cannot parse."""

    __slots__ = ("_caps", "_host", "_retry_after_s")

    def __init__(
        self,
        manager: web.Server,
        *,
        connections: Connections,
        retry_after_s: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._caps = connections
        self._retry_after_s = retry_after_s
        self._host: str | None = None  # set while the connection is counted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection, or answer 503 and hand the socket to ``_Refused``."""
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        cap = self._caps.open(host)
        if cap is None:
            self._host = host
            super().connection_made(transport)
            return
        transport = cast(asyncio.Transport, transport)  # a TCP site's: writable, with EOF
        log.info("connection refused", extra=fields(client=host, limit=cap))
        transport.write(raw_response(connection_refused(cap, self._retry_after_s)))
        if self._caps.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # the answer is whole: the client reads it, then EOF
        transport.set_protocol(_Refused(self._caps, transport))

    def connection_lost(self, exc: BaseException | None) -> None:
        """Uncount the connection (once, however it ended)."""
        if self._host is not None:
            self._caps.close(self._host)
            self._host = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as aiohttp does, but end a body the parser gave up on with its error.

        On a malformed chunk that arrives after the headers, aiohttp's C parser queues a 400
        for after the request, yet leaves the request's body open: the handler reading it
        would wait out the body timeout (408). Ending the body with the parse error makes it
        the 400 (``error_middleware``) at once; the queued one is never sent, as the 400
        closes the connection.
        """
        # aiohttp's internals, read with getattr: should a later aiohttp rename them, this
        # falls back to its own behaviour (the 408) instead of breaking every connection.
        queued = len(getattr(self, "_messages", ()))
        super().data_received(data)
        messages: Sequence[Any] = getattr(self, "_messages", ())
        request = getattr(self, "_current_request", None)
        if request is None or len(messages) <= queued:
            return
        error = getattr(messages[-1][0], "exc", None)  # a queued parse error, not a request
        body = request.content
        if isinstance(error, BaseException) and not body.is_eof() and body.exception() is None:
            body.set_exception(web.RequestPayloadError(parse_reason(error)), error)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or to an error that escaped
        every middleware), as an OpenAI error; the connection is closed after it."""
        reply = protocol_error(status, exc)
        if reply.status >= 500:
            # Past error_middleware, this is a gateway bug: the traceback goes to the log.
            log.error("unhandled error", exc_info=exc, extra=fields(client=request.remote))
        else:
            reason = parse_reason(exc) if isinstance(exc, BaseException) else message
            log.info(
                "malformed request",
                extra=fields(client=request.remote, status=reply.status, reason=reason),
            )
        if request.writer.output_size > 0:
            # A response had begun: no second one fits on this connection (as aiohttp).
            raise ConnectionError("an error after the response began; closing the connection")
        response = reply_response(reply)
        response.force_close()
        return response


class GatewayServer(web.Server):
    """``web.Server`` whose connections get ``ConnectionHandler``s."""

    def __init__(self, made: web.Server, *, connections: Connections, retry_after_s: int) -> None:
        # ``made`` is the server aiohttp built for the app (its request handler and factory,
        # and the handlers' settings): the same, but with this server's handler class.
        self._handler_kwargs: dict[str, Any] = dict(made._kwargs)
        super().__init__(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            **self._handler_kwargs,
        )
        self._caps = connections
        self._retry_after_s = retry_after_s

    def __call__(self) -> web.RequestHandler:
        """A handler for a new connection (the listening socket's protocol factory)."""
        return ConnectionHandler(
            self,
            loop=asyncio.get_running_loop(),
            connections=self._caps,
            retry_after_s=self._retry_after_s,
            **self._handler_kwargs,
        )


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose server counts connections and shapes protocol errors."""

    __slots__ = ("_caps", "_retry_after_s")

    def __init__(
        self,
        app: web.Application,
        *,
        connections: Connections,
        retry_after_s: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._caps = connections
        self._retry_after_s = retry_after_s

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # starts the app (cleanup_ctx), as always
        return GatewayServer(made, connections=self._caps, retry_after_s=self._retry_after_s)
