"""The swap pool (``python -m hpc.swappool --plan FILE|-``): one job, a catalogue of models.

It runs inside the job the way the job wrapper does, but instead of one engine it serves
an OpenAI-compatible endpoint for every model of its catalogue and loads them on request
(hpc.poolslots): a request for a loaded model goes straight to its engine, streamed chunk
by chunk as it arrives; one for another model waits for a slot and its engine's health.

Every route but ``/health`` requires the per-job key of the pool's registry record (the
gateway sends it; it never appears on a command line). The record is published ``ready``
once the pool listens: the pool is ready to take requests, not to answer them instantly.
TERM, INT, USR1 and USR2 mark it ``draining``, stop every engine's process tree and mark it
``gone``, as the job wrapper does.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import INVALID_REQUEST, SERVER_ERROR, error_middleware, openai_error
from hpc.engines import build_launch
from hpc.errors import MTError
from hpc.jobplan import PoolPlan
from hpc.jobrecord import JobRecord
from hpc.jobwrap import STOP_SIGNALS, advertised_host
from hpc.poolslots import Launcher, Slots

PROXIED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_PUBLIC_PATHS = frozenset({"/health"})
_HOP_HEADERS = ("Content-Type", "Cache-Control")

SLOTS = web.AppKey("slots", Slots)
KEY = web.AppKey("key", str)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every path but ``/health`` needs ``Authorization: Bearer <the job's key>``."""
    if request.path in _PUBLIC_PATHS:
        return await handler(request)
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
    try:
        slot = await slots.acquire(model)
    except MTError as exc:
        return openai_error(
            503, exc.message, SERVER_ERROR, "model_load_failed", headers={"Retry-After": "5"}
        )
    response: web.StreamResponse | None = None
    try:
        headers = {"Authorization": f"Bearer {slot.key}", "Content-Type": "application/json"}
        async with slots.session.post(slot.url(request.path), data=body, headers=headers) as up:
            response = web.StreamResponse(
                status=up.status,
                headers={h: up.headers[h] for h in _HOP_HEADERS if h in up.headers},
            )
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        if response is not None:
            raise  # bytes already went out: the client sees the stream end early
        return openai_error(502, f"{model}'s engine failed: {exc}", SERVER_ERROR, "upstream_error")
    finally:
        slots.release(slot)


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

    def _say(self, message: str) -> None:
        self.out.write(f"[mt swappool] {message}\n")
        self.out.flush()

    def _listen(self) -> socket.socket:
        host = self.plan.engine_host
        bind_host = "" if host in ("0.0.0.0", "::") else host  # noqa: S104 - compared
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, 0))  # the OS picks the port and we hold it: no race
        return sock

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
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                slots = Slots(self.plan, self.environ, self.out, session, self.launcher)
            except MTError as exc:
                self.job.set(record, "failed", reason=exc.message)
                return 1
            runner = web.AppRunner(create_app(slots, key), access_log=None)
            await runner.setup()
            sock = self._listen()
            port = int(sock.getsockname()[1])
            await web.SockSite(runner, sock).start()
            base_url = f"http://{advertised_host(self.plan.engine_host)}:{port}/v1"
            record = self.job.set(record, "ready", port=port, base_url=base_url)
            self._say(f"serving {', '.join(pool.models)} on port {port} ({pool.slots} slots)")
            tending = asyncio.create_task(slots.tend())
            try:
                await stopped.wait()
            finally:
                tending.cancel()
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "stop"
                record = self.job.set(record, "draining", reason=f"received {name}")
                await slots.stop_all()
                await runner.cleanup()
                self.job.set(record, "gone", reason=f"stopped by {name}")
        return 0

    def _on_signal(self, signum: int, stopped: asyncio.Event) -> None:
        self.stop_signal = signum
        stopped.set()

    def run(self) -> int:
        """Run the pool's event loop until it stops; returns the exit code."""
        return asyncio.run(self.serve())


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.swappool``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.swappool", description=__doc__)
    parser.add_argument(
        "--plan", required=True, help="the pool plan JSON file, or - to read it from stdin"
    )
    args = parser.parse_args(argv)
    text = sys.stdin.read() if args.plan == "-" else Path(args.plan).read_text(encoding="utf-8")
    plan = PoolPlan.model_validate_json(text)
    return SwapPool(plan, os.environ, sys.stdout).run()


if __name__ == "__main__":
    sys.exit(main())
