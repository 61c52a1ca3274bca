"""The swap pool (``python -m hpc.job.swappool --plan FILE|-``): one job, a catalogue of models.

It runs inside the job the way the job wrapper does, but instead of one engine it serves
an OpenAI-compatible endpoint for every model of its catalogue and loads them on request
(hpc.job.slots): a request for a loaded model goes straight to its engine, streamed chunk
by chunk as it arrives; one for another model waits for a slot and its engine's health.

The pool is its job's front (hpc.job.front): TLS on the node's port with a certificate the
record pins, every route behind the per-job key, engines on Unix sockets only it reaches.
The record is published ``ready`` once the pool listens, not once a model is loaded.
TERM, INT, USR1 and USR2 mark it ``draining``, let the requests in flight (which the pool
counts itself) finish within the plan's drain budget, stop every engine's process tree and
mark it ``gone``, as the job wrapper does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from hpc.errors import MTError
from hpc.job.drain import POLL_S, SETTLE_S
from hpc.job.engines import build_launch
from hpc.job.front import bind_node_port
from hpc.job.jobdir import JobDir
from hpc.job.plan import PoolPlan
from hpc.job.record import JobRecord, RecordEnded
from hpc.job.slots import Launcher, Slot, Slots
from hpc.job.tlscert import make_cert
from hpc.job.wrapper import STOP_SIGNALS, advertised_host
from hpc.openai import (
    INVALID_REQUEST,
    PROXIED_PATHS,
    SERVER_ERROR,
    SSE_HEADERS,
    error_body,
    error_event,
    error_object,
    http_error,
    kept_headers,
)
from hpc.site import is_wildcard

log = logging.getLogger("mt.swappool")

_HOP_HEADERS = ("Content-Type", "Cache-Control")

SLOTS = web.AppKey("slots", Slots)
KEY = web.AppKey("key", str)


def openai_error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON error response in OpenAI's shape."""
    body = error_object(message, type_, code, param)
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own HTTP errors (404, 405, 413) and escaped exceptions (500, logged) in
    OpenAI's shape, as the gateway answers them."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message, type_, code = http_error(
            exc.status, request.method, request.path, exc.reason, request.client_max_size
        )
        headers = kept_headers(exc.headers)
        return openai_error(exc.status, message, type_, code, headers=headers)
    except Exception as exc:
        # The pool's one boundary where an unexpected error becomes a 500; the traceback
        # goes to the job's log, never to the client.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return openai_error(
            500, f"internal gateway error ({type(exc).__name__})", SERVER_ERROR, "internal_error"
        )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every path needs ``Authorization: Bearer <the job's key>``, ``/health`` too."""
    given = request.headers.get("Authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {request.app[KEY]}".encode()):
        return openai_error(
            401, "this swap pool needs its job's key", INVALID_REQUEST, "invalid_api_key"
        )
    return await handler(request)


async def _proxy(request: web.Request) -> web.StreamResponse:
    """Forward one OpenAI request to the engine of its model, loading that model if needed."""
    slots = request.app[SLOTS]
    body = await request.read()
    try:
        payload = json.loads(body)
    except ValueError:
        return openai_error(400, "request body is not JSON", INVALID_REQUEST, "invalid_json")
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or model not in slots.specs:
        names = ", ".join(slots.specs)
        return openai_error(
            404,
            f"model {model!r} is not in this pool's catalogue ({names})",
            INVALID_REQUEST,
            "model_not_found",
            param="model",
        )
    stream = isinstance(payload, dict) and payload.get("stream") is True
    if stream and slots.serving(model) is None:
        return await _stream_cold(request, slots, model, body)
    try:
        slot = await slots.acquire(model)
    except MTError as exc:
        return openai_error(
            503, exc.message, SERVER_ERROR, "model_load_failed", headers={"Retry-After": "5"}
        )
    try:
        return await _relay(request, slots, slot, body, None)
    finally:
        slots.release(slot)


async def _stream_cold(
    request: web.Request, slots: Slots, model: str, body: bytes
) -> web.StreamResponse:
    """A stream for a model that is not loaded: 200 at once, comments while it loads.

    The client (and the gateway's time-to-first-token clock) gets its first bytes now
    instead of after the load; SSE clients ignore comment lines. The engine's stream then
    follows in the same response. A load failure can no longer change the status, so it
    becomes an in-band error event, with no ``[DONE]``.
    """
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await out.prepare(request)
    acquiring = asyncio.ensure_future(slots.acquire(model))
    try:
        slot = await _keep_alive(out, slots, model, acquiring)
    except MTError as exc:
        await _end_with_error(out, exc.message, "model_load_failed")
        return out
    except BaseException as exc:  # the client left (or the handler is cancelled)
        # Stop waiting; the load itself goes on for the others (acquire shields it).
        done = not acquiring.cancel() and not acquiring.cancelled()
        if done and acquiring.exception() is None:
            slots.release(acquiring.result())  # it was done: its slot was counted in
        if isinstance(exc, ConnectionError):
            return out
        raise
    try:
        return await _relay(request, slots, slot, body, out)
    except ConnectionError:  # the client left mid-stream: closing the engine's request
        return out  # (leaving the ``async with``) is what stops its generation
    finally:
        slots.release(slot)


async def _keep_alive(
    out: web.StreamResponse, slots: Slots, model: str, acquiring: asyncio.Future[Slot]
) -> Slot:
    """Write ``: loading …`` comments every ``keepalive_s`` until ``acquiring`` is done."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _turn in range(3):  # let acquire start the load and claim an empty slot, if one is
        await asyncio.sleep(0)
    slot = slots.loading_slot(model)
    where = f"in slot {slot.index}" if slot is not None else "(waiting for a free slot)"
    await out.write(f": loading {model} {where}\n\n".encode())
    interval = slots.plan.pool.keepalive_s
    while True:
        done, _pending = await asyncio.wait({acquiring}, timeout=interval)
        if done:
            return acquiring.result()
        await out.write(f": loading {model} ({loop.time() - started:.0f}s)\n\n".encode())


async def _end_with_error(out: web.StreamResponse, message: str, code: str) -> None:
    """An in-band error event ends a stream whose 200 is already out (no [DONE])."""
    with contextlib.suppress(ConnectionError):
        await out.write(error_event(error_body(message, SERVER_ERROR, code)))
        await out.write_eof()


async def _relay(
    request: web.Request,
    slots: Slots,
    slot: Slot,
    body: bytes,
    out: web.StreamResponse | None,
) -> web.StreamResponse:
    """Forward to ``slot``'s engine and relay its answer chunk by chunk; into ``out`` if it
    is given (a stream whose 200 already went out while the model loaded)."""
    model, cold = slot.model, out is not None
    headers = {"Authorization": f"Bearer {slot.key}", "Content-Type": "application/json"}
    try:
        async with slot.client().post(slot.url(request.path), data=body, headers=headers) as up:
            if out is not None and up.status != 200:
                answer = await up.read()
                message = f"{model}'s engine answered {up.status}: {answer[:500]!r}"
                await _end_with_error(out, message, "upstream_error")
                return out
            if out is None:
                out = web.StreamResponse(
                    status=up.status,
                    headers={h: up.headers[h] for h in _HOP_HEADERS if h in up.headers},
                )
                await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
    except aiohttp.ClientError as exc:
        if out is None:
            return openai_error(
                502, f"{model}'s engine failed: {exc}", SERVER_ERROR, "upstream_error"
            )
        if not cold:
            raise  # bytes already went out: the client sees the stream end early
        # The 200 went out before the engine was asked: the error goes in-band, no [DONE].
        await _end_with_error(out, f"{model}'s engine failed: {exc}", "upstream_error")
        return out


async def _status(request: web.Request) -> web.Response:
    """GET /pool/status: every slot and the catalogue."""
    return web.json_response(request.app[SLOTS].status())


async def _models(request: web.Request) -> web.Response:
    """GET /v1/models: the catalogue (every name can be asked for, loaded or not)."""
    data = [{"id": name, "object": "model", "owned_by": "mt"} for name in request.app[SLOTS].specs]
    return web.json_response({"object": "list", "data": data})


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(slots: Slots, key: str) -> web.Application:
    """The pool's aiohttp app around ``slots``, requiring ``key``."""
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[SLOTS] = slots
    app[KEY] = key
    for path in PROXIED_PATHS:
        app.router.add_post(path, _proxy)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/pool/status", _status)
    app.router.add_get("/health", _health)
    return app


class SwapPool:
    """Runs the pool for one job and keeps its registry record true."""

    def __init__(
        self,
        plan: PoolPlan,
        environ: Mapping[str, str],
        out: IO[str],
        launcher: Launcher = build_launch,
    ) -> None:
        self.plan = plan
        self.environ = environ
        self.out = out
        self.launcher = launcher
        self.job = JobRecord(
            plan.registry_dir,
            backend=plan.backend,
            job_id=plan.job_id,
            environ=environ,
            say=self._say,
        )
        self.stop_signal: int | None = None
        self._signals: list[tuple[int, float]] = []  # every stop signal, and when (loop time)

    def _say(self, message: str) -> None:
        self.out.write(f"[mt swappool] {message}\n")
        self.out.flush()

    async def serve(self) -> int:
        """Serve until a stop signal; 0 when stopped, 1 when the pool could not start."""
        pool = self.plan.pool
        record = self.job.claim(
            nonce=self.plan.nonce, model=pool.name, engine="pool", serves=pool.models
        )
        key = record.api_key.get_secret_value()
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig, stopped)
        try:
            slots = Slots(self.plan, self.environ, self.out, self.launcher)
            home = JobDir(prefix="mt-pool-")
        except MTError as exc:
            self.job.set(record, "failed", reason=exc.message)
            return 1
        try:
            # The pool is its job's front: the node's port, TLS with a pinned certificate,
            # the job's key on every path (hpc.job.front says why).
            cert = make_cert(home.path, f"mt pool {pool.name}")
            runner = web.AppRunner(create_app(slots, key), access_log=None)
            await runner.setup()
            host = "" if is_wildcard(self.plan.engine_host) else self.plan.engine_host
            sock = bind_node_port(host)
            port = int(sock.getsockname()[1])
            await web.SockSite(runner, sock, ssl_context=cert.server_context()).start()
            base_url = f"https://{advertised_host(self.plan.engine_host)}:{port}/v1"
            record = self.job.set(
                record, "ready", port=port, base_url=base_url, tls_sha256=cert.sha256
            )
            self._say(f"serving {', '.join(pool.models)} on port {port} ({pool.slots} slots)")
            tending = asyncio.create_task(slots.tend())
            try:
                await stopped.wait()
            finally:
                tending.cancel()
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
                with contextlib.suppress(RecordEnded):  # ended from outside: stop all the same
                    record = self.job.set(record, "draining", reason=f"received {name}")
                await self._drain(slots)
                await slots.stop_all()
                await runner.cleanup()
                with contextlib.suppress(RecordEnded):
                    self.job.set(record, "gone", reason=f"stopped by {name}")
        finally:
            home.remove()
        return 0

    def _on_signal(self, signum: int, stopped: asyncio.Event) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self._signals.append((signum, asyncio.get_running_loop().time()))
        stopped.set()

    async def _drain(self, slots: Slots) -> None:
        """Until nothing is in flight (after SETTLE_S) or the earliest signal's budget ends."""
        if not self._signals:  # stopped by an error, not a signal: nothing to wait for
            return
        loop = asyncio.get_running_loop()
        started = loop.time()

        def deadline() -> float:
            return min(at + self.plan.drain_budget_s(sig) for sig, at in self._signals)

        while loop.time() < deadline():
            if slots.in_flight() == 0 and loop.time() - started >= SETTLE_S:
                self._say(f"drained after {loop.time() - started:.1f}s: nothing in flight")
                return
            await asyncio.sleep(min(POLL_S, max(0.0, deadline() - loop.time())))
        self._say(f"drain budget spent: {slots.in_flight()} request(s) in flight; stopping")

    def run(self) -> int:
        """Run the pool's event loop until it stops; returns the exit code (0 if its record
        was ended from outside: nobody routes to it any more)."""
        try:
            return asyncio.run(self.serve())
        except RecordEnded as exc:
            self._say(f"stopping: {exc}")
            return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.job.swappool``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.job.swappool", description=__doc__)
    parser.add_argument(
        "--plan", required=True, help="the pool plan JSON file, or - to read it from stdin"
    )
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.plan == "-" else Path(args.plan).read_text(encoding="utf-8")
    plan = PoolPlan.model_validate_json(text)
    return SwapPool(plan, os.environ, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
