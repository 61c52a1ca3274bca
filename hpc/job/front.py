"""The job's front: the one thing a job listens with on its node's network.

The job wrapper binds the node's TCP port itself, before the engine starts (the OS picks
the port and the wrapper holds it: no window for another user to take it), and serves there:

- TLS with the job's own certificate (hpc.job.tlscert), whose SHA-256 the record carries:
  the gateway pins it (hpc.tlspin) and sends nothing to a server that cannot present it;
- the per-job key on **every** path (``Authorization: Bearer``, compared in constant time):
  without it, 401 and nothing else, whatever the path;
- the routes an engine serves for its clients only (:data:`ROUTES`); the others (vLLM's
  ``/invocations`` runs inference with no key of its own, ``/load``, ``/sleep``,
  ``/collective_rpc``, LoRA loading, llama-server's slot saving …) answer 403 unless the
  model spec lists them in ``expose_routes``.

Behind it the engine listens on a Unix socket in the job's 0700 directory
(hpc.job.jobdir), which no other user can connect to, with a key of its own that never
leaves the node. The front counts the requests it is forwarding: that count is what the
drain waits on (hpc.job.drain).

It runs on its own thread and event loop inside the wrapper (:meth:`Front.start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hmac
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from hpc.openai import INVALID_REQUEST, SERVER_ERROR, error_body

# (method, path glob) an engine serves its clients: OpenAI's API, health, load and metrics
# (what the gateway probes), tokenizing. Everything else is refused unless exposed.
ROUTES: tuple[tuple[str, str], ...] = (
    ("*", "/v1/*"),
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/slots"),
    ("GET", "/props"),
    ("GET", "/version"),
    ("GET", "/ping"),
    ("GET", "/openapi.json"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
)
# Under /v1 but never for clients: they change what the engine serves.
DENIED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
MAX_BODY_BYTES = 64 * 1024 * 1024
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_REQUEST_DROPPED = _HOP_BY_HOP | {"authorization", "x-api-key"}
_RESPONSE_DROPPED = (_HOP_BY_HOP - {"content-length"}) | {"date", "server"}


@dataclass(frozen=True)
class RoutePolicy:
    """Which requests the front forwards: :data:`ROUTES` plus the spec's ``expose_routes``."""

    exposed: tuple[str, ...] = ()

    def allows(self, method: str, path: str) -> bool:
        """True if ``method path`` may reach the engine."""
        if any(fnmatch.fnmatchcase(path, glob) for glob in self.exposed):
            return True
        if path in DENIED:
            return False
        return any(
            (m in ("*", method) or (m == "GET" and method == "HEAD"))
            and fnmatch.fnmatchcase(path, glob)
            for m, glob in ROUTES
        )


def _error(status: int, message: str, code: str) -> web.Response:
    type_ = INVALID_REQUEST if status < 500 else SERVER_ERROR
    return web.Response(
        status=status, body=error_body(message, type_, code), content_type="application/json"
    )


@dataclass
class Front:
    """The authenticating TLS front of one job (see the module doc)."""

    listener: socket.socket
    engine_socket: Path
    key: str = field(repr=False)
    engine_key: str = field(repr=False)
    tls: ssl.SSLContext | None
    policy: RoutePolicy = field(default_factory=RoutePolicy)
    # Paths not counted in flight: the gateway's health probes come every few seconds.
    quiet_paths: frozenset[str] = frozenset()
    in_flight: int = 0
    # The job's first answer: from the first counted POST's arrival to the first bytes of
    # the engine's 200 (the "first token" start-up phase, hpc.phases); None until then.
    first_token_s: float | None = None
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False, repr=False)
    _stop: asyncio.Event | None = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _started: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)

    @property
    def port(self) -> int:
        """The node port it holds."""
        return int(self.listener.getsockname()[1])

    # drain.Counter
    @property
    def method(self) -> str:
        """How :meth:`count` counts, for the job log."""
        return "front"

    def count(self) -> int | None:
        """Requests being forwarded now (health probes aside)."""
        return self.in_flight

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Serve on a thread of its own; returns once it accepts connections."""
        self._thread = threading.Thread(target=self._run, name="mt-front", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise OSError("the job's front did not start")
        if self._error is not None:
            raise OSError(f"the job's front did not start: {self._error}") from self._error

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving (connections still open are closed) and release the port."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)
        with contextlib.suppress(OSError):
            self.listener.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start(), never lost
            self._error = exc
            self._started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # One engine connection per request: llama-server closes a Unix-socket connection
        # after an answer, and a reused one then fails (502) with nothing sent. A connect on
        # a local socket costs microseconds (bench/front_cost.py measures the whole front).
        connector = aiohttp.UnixConnector(path=str(self.engine_socket), limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            app = web.Application(client_max_size=MAX_BODY_BYTES)
            app.router.add_route("*", "/{tail:.*}", self._handler(session))
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                site = web.SockSite(runner, self.listener, ssl_context=self.tls)
                await site.start()
                self._started.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()

    # -- requests -------------------------------------------------------------------------
    def _authorised(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, b"Bearer " + self.key.encode())

    def _handler(self, session: aiohttp.ClientSession) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if not self._authorised(request):
                return _error(401, "this job needs its key", "invalid_api_key")
            if not self.policy.allows(request.method, request.path):
                return _error(
                    403,
                    f"{request.method} {request.path} is not exposed by this job's front "
                    "(a model spec can list it in expose_routes)",
                    "route_not_exposed",
                )
            counted = request.path not in self.quiet_paths
            if counted:
                self.in_flight += 1
            # Only until the first answer: later requests pay nothing for this.
            timed = counted and request.method == "POST" and self.first_token_s is None
            try:
                return await self._forward(session, request, time.monotonic() if timed else None)
            finally:
                if counted:
                    self.in_flight -= 1

        return handle

    async def _forward(
        self, session: aiohttp.ClientSession, request: web.Request, timed_from: float | None
    ) -> web.StreamResponse:
        body = await request.read()
        headers = _kept(request.headers.items(), _REQUEST_DROPPED)
        headers.append(("Authorization", f"Bearer {self.engine_key}"))
        try:
            upstream = await session.request(
                request.method,
                "http://engine" + request.path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return _error(
                502, f"the engine cannot be reached ({type(exc).__name__})", "engine_down"
            )
        async with upstream:
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in _kept(upstream.headers.items(), _RESPONSE_DROPPED):
                out.headers.add(name, value)
            await out.prepare(request)
            if timed_from is not None and upstream.status != 200:
                timed_from = None
            try:
                async for chunk in upstream.content.iter_any():
                    if timed_from is not None and self.first_token_s is None:
                        self.first_token_s = round(time.monotonic() - timed_from, 3)
                        timed_from = None
                    await out.write(chunk)
                await out.write_eof()
            except aiohttp.ClientPayloadError:
                # The engine's answer broke off: so must ours, never a clean end of body.
                if request.transport is not None:
                    request.transport.abort()
            except ConnectionResetError:
                pass  # the client left (maybe once it had [DONE]); the engine's side closes
            return out


def _kept(items: Iterable[tuple[str, str]], dropped: frozenset[str]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in items if name.lower() not in dropped]


def bind_node_port(host: str) -> socket.socket:
    """A listening TCP socket on ``host`` (``""``/``0.0.0.0``: every address), port by the OS."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
