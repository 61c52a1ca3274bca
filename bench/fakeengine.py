"""A fake inference engine: for the gateway tests, and the bench's gateway-overhead run.

It stands for the OpenAI-compatible server of vLLM (``vllm serve``) or llama.cpp
(``llama-server`` / ``llama_cpp.server``) that a ModelTainer job runs, and speaks the same
wire format: ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``,
JSON answers, and for ``"stream": true`` Server-Sent Events ``data: {...}\\n\\n`` ending
with ``data: [DONE]\\n\\n``; it requires ``Authorization: Bearer <job key>`` as the real
engines do when started with an API key.

It also answers the agent APIs (vLLM's ``/v1/responses``, ``/v1/messages``) and the
engines' other model endpoints; what it answers is ``bench.fakeanswers``.

It is a real aiohttp app on 127.0.0.1, port 0. Its behaviour is set by ``Knobs`` when it
is made (no module globals), and ``Seen`` counts what it received, including requests
whose client went away before the answer was done (a real engine aborts those): each is
logged (logger ``bench.fakeengine``, on stderr when run alone) and kept in ``Seen.aborted``
with its ``X-Request-Id`` and the phase it was in: before the first byte of the body,
mid-stream, or a non-streaming answer.

For the gateway's health prober it also stands for vLLM's ``GET /health`` (which can be
made to fail or hang) and ``GET /metrics`` (vLLM's Prometheus text with
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` set by knobs). Knobs can be
swapped while it runs (``fake.knobs = dataclasses.replace(fake.knobs, …)``): every request
reads the current ones.

``python -m bench.fakeengine [--tokens N] [--tokens-per-s R] [--ttft-ms T]`` runs it alone
(in its own process, so that it does not share a core with the load generator) and prints
``fake engine listening on http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from bench.fakeanswers import (
    AGENT_PATHS,
    OTHER_PATHS,
    agent_answer,
    answer,
    chunk_of,
    other_answer,
    usage_of,
)


@dataclass(frozen=True)
class Knobs:
    """How the fake behaves."""

    ttft_s: float = 0.0  # before the first token (non-streaming: before the answer)
    tokens_per_s: float = 0.0  # 0 = as fast as possible
    tokens: int = 3
    cut_after: int | None = None  # streaming: abort the connection after this many chunks
    omit_done: bool = False  # streaming: end cleanly but without ``data: [DONE]``
    status: int = 200  # anything else: answer an OpenAI-shaped error with this status
    raw_error: bytes | None = None  # with ``status``: answer these bytes instead (text/plain)
    require_key: str | None = None  # 401 unless ``Authorization: Bearer <require_key>``
    drop_requests: int = 0  # close the connection unanswered on the first N requests
    use_max_tokens: bool = False  # answer min(tokens, the request's max_tokens) tokens
    no_usage: bool = False  # streaming: no usage chunk, even when asked (llama-cpp-python)
    # streaming: after this many chunks an in-band ``data: {"error": …}`` event, then the
    # usage chunk and ``[DONE]`` as vLLM sends them after an error
    error_after: int | None = None
    # streaming: this many SSE comments (``: keep-alive``), ``comment_gap_s`` apart, before
    # the first event (as a swap pool sends while it loads the model)
    comments: int = 0
    comment_gap_s: float = 0.0
    pad_bytes: int = 0  # streaming: each chunk's text is this many bytes longer
    status_first: int | None = None  # with ``status``: only the first N requests get it
    retry_after: str | None = None  # with ``status``: the error's ``Retry-After`` header
    # GET /health (vLLM's and llama-server's): this status, or no answer at all
    health_status: int = 200
    health_hang: bool = False
    # GET /metrics in vLLM's format: vllm:num_requests_running / vllm:num_requests_waiting
    engine_running: int = 0
    engine_waiting: int = 0


AbortPhase = Literal["before first byte", "mid-stream", "non-stream"]
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Abort:
    """A request whose client went away before its answer was done."""

    request_id: str | None  # its X-Request-Id header
    phase: AbortPhase


@dataclass
class _Exchange:
    """How far one answer got, for the abort log."""

    streaming: bool = False
    chunks: int = 0
    cut: bool = False  # the fake aborted the connection itself (``Knobs.cut_after``)


@dataclass
class Seen:
    """What the fake received and did."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0  # len(aborted)
    aborted: list[Abort] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    first_chunk_at: float | None = None  # time.monotonic() of the first streamed chunk
    last_chunk_at: float | None = None  # ... and of the last one
    chunks_sent: int = 0  # streamed chunks written, over all requests
    cancelled_event: asyncio.Event = field(default_factory=asyncio.Event)
    health_probes: int = 0  # GET /health received
    metrics_scrapes: int = 0  # GET /metrics received
    probe_authorization: list[str | None] = field(default_factory=list)  # of both
    paths: list[str] = field(default_factory=list)  # path and query of each POST
    headers: list[dict[str, str]] = field(default_factory=list)  # of each POST


class FakeUpstream:
    """An OpenAI-compatible engine on 127.0.0.1:<ephemeral port>; use ``async with``."""

    def __init__(
        self,
        knobs: Knobs | None = None,
        model: str = "fake-model",
        port: int = 0,
        uds: str | None = None,
    ) -> None:
        self.knobs = knobs or Knobs()
        self.model = model
        self.seen = Seen()
        self.port = port
        self.uds = uds  # a Unix socket instead of a port, as a job's engine listens
        self._runner: web.AppRunner | None = None
        self.responses: set[str] = set()  # the ids of the responses it stored

    @property
    def base_url(self) -> str:
        """The OpenAI root, as a registry record holds it."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeUpstream:
        # Real engines take large bodies (base64 images); aiohttp's default cap is 1 MiB.
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", *AGENT_PATHS):
            app.router.add_post(path, self._handle)
        for path in OTHER_PATHS:
            app.router.add_post(path, self._handle)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: like the real engines, notice a client that left at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        if self.uds is not None:
            await web.UnixSite(self._runner, self.uds).start()
            return self
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        self.seen.health_probes += 1
        self.seen.probe_authorization.append(request.headers.get("Authorization"))
        if self.knobs.health_hang:
            await asyncio.Event().wait()  # until the prober gives up and disconnects
        if self.knobs.health_status != 200:
            return web.json_response({"status": "unhealthy"}, status=self.knobs.health_status)
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        # vLLM's exposition: one series per model and engine index, values as floats.
        self.seen.metrics_scrapes += 1
        self.seen.probe_authorization.append(request.headers.get("Authorization"))
        labels = f'{{engine="0",model_name="{self.model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(self.knobs.engine_running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(self.knobs.engine_waiting)}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    async def _models(self, _request: web.Request) -> web.Response:
        entry = {"id": self.model, "object": "model", "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [entry]})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.requests += 1
        self.seen.authorization.append(request.headers.get("Authorization"))
        self.seen.request_ids.append(request.headers.get("X-Request-Id"))
        self.seen.paths.append(request.path_qs)
        self.seen.headers.append(dict(request.headers))
        body = await request.read()
        self.seen.bodies.append(body)
        knobs = self.knobs
        if self.seen.requests <= knobs.drop_requests:
            # Like an engine that crashed or closed an idle keep-alive connection.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if knobs.require_key is not None and (
            request.headers.get("Authorization") != f"Bearer {knobs.require_key}"
        ):
            return _error(401, "invalid api key", "authentication_error")
        if knobs.status != 200 and (
            knobs.status_first is None or self.seen.requests <= knobs.status_first
        ):
            if knobs.raw_error is not None:
                return web.Response(status=knobs.status, body=knobs.raw_error)
            error = _error(knobs.status, f"fake engine answers {knobs.status}", "server_error")
            if knobs.retry_after is not None:
                error.headers["Retry-After"] = knobs.retry_after
            return error
        if request.path in OTHER_PATHS:
            return web.json_response(other_answer(request, body))
        payload = json.loads(body)
        if request.path in AGENT_PATHS:
            return await self._agent(request, payload)
        exchange = _Exchange()
        try:
            if payload.get("stream") is True and not request.path.endswith("/embeddings"):
                exchange.streaming = True
                return await self._stream(request, payload, exchange)
            tokens = self._tokens(payload)
            await asyncio.sleep(knobs.ttft_s + self._generation_s(tokens))
            self.seen.completed += 1
            return web.json_response(answer(request.path, payload, tokens, self.model))
        except (asyncio.CancelledError, ConnectionResetError):
            # A deliberate cut aborts our own transport; only count clients that left.
            if not exchange.cut:
                self._aborted(request.headers.get("X-Request-Id"), exchange)
            raise

    async def _agent(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        """The Responses and Messages APIs (``bench.fakeanswers``)."""
        self.seen.completed += 1
        tokens, knobs = self._tokens(payload), self.knobs
        cut = (knobs.cut_after, knobs.omit_done)
        return await agent_answer(
            request, payload, tokens, cut, self.responses, f"resp_{self.port}"
        )

    def _aborted(self, request_id: str | None, exchange: _Exchange) -> None:
        phase: AbortPhase = "non-stream"
        if exchange.streaming:
            phase = "mid-stream" if exchange.chunks else "before first byte"
        self.seen.aborted.append(Abort(request_id, phase))
        self.seen.cancelled += 1
        self.seen.cancelled_event.set()
        _log.warning(
            "aborted request_id=%s phase=%s chunks_sent=%d",
            request_id or "-",
            phase,
            exchange.chunks,
        )

    def _tokens(self, payload: dict[str, Any]) -> int:
        asked = payload.get("max_tokens")
        if self.knobs.use_max_tokens and isinstance(asked, int) and asked > 0:
            return min(asked, self.knobs.tokens)
        return self.knobs.tokens

    def _generation_s(self, tokens: int) -> float:
        rate = self.knobs.tokens_per_s
        return tokens / rate if rate > 0 else 0.0

    async def _stream(
        self, request: web.Request, payload: dict[str, Any], exchange: _Exchange
    ) -> web.StreamResponse:
        knobs = self.knobs
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # headers go out at once, as vLLM's do
        for turn in range(knobs.comments):
            if turn:
                await asyncio.sleep(knobs.comment_gap_s)
            await response.write(b": keep-alive\n\n")
        await asyncio.sleep(knobs.ttft_s)
        gap = 1 / knobs.tokens_per_s if knobs.tokens_per_s > 0 else 0.0
        chat = request.path.endswith("/chat/completions")
        tokens = self._tokens(payload)
        for index in range(tokens):
            if index:
                await asyncio.sleep(gap)
            if knobs.cut_after is not None and index >= knobs.cut_after:
                exchange.cut = True
                if request.transport is not None:
                    request.transport.abort()
                return response
            if knobs.error_after is not None and index >= knobs.error_after:
                failed = {"error": {"message": "fake engine failed", "type": "server_error"}}
                await response.write(b"data: " + json.dumps(failed).encode() + b"\n\n")
                break
            last = index == tokens - 1
            text = f"tok{index} " + "x" * knobs.pad_bytes
            chunk = chunk_of(self.model, chat, text, "stop" if last else None)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            exchange.chunks += 1
            self.seen.chunks_sent += 1
            now = time.monotonic()
            if self.seen.first_chunk_at is None:
                self.seen.first_chunk_at = now
            self.seen.last_chunk_at = now
        options = None if knobs.no_usage else payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            # OpenAI's last chunk for include_usage: no choices, the usage of the whole answer.
            final = chunk_of(self.model, chat, "", None)
            final["choices"] = []
            final["usage"] = usage_of(payload, tokens)
            await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        if not knobs.omit_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.seen.completed += 1
        return response


def _error(status: int, message: str, type_: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return web.json_response(body, status=status)


async def _serve(knobs: Knobs, model: str, port: int, uds: str | None = None) -> None:
    async with FakeUpstream(knobs, model=model, port=port, uds=uds) as fake:
        where = uds if uds is not None else fake.base_url
        sys.stdout.write(f"fake engine listening on {where}\n")
        sys.stdout.flush()
        await asyncio.Event().wait()  # until the process is terminated


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fakeengine``: serve the fake engine until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--uds", default=None, help="listen on this Unix socket instead")
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (at most)")
    parser.add_argument("--tokens-per-s", type=float, default=0.0, help="0: as fast as it can")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    # The abort log goes to stderr (the bench keeps it in engine.log); stdout has one line.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(message)s")
    knobs = Knobs(
        ttft_s=args.ttft_ms / 1000,
        tokens_per_s=args.tokens_per_s,
        tokens=args.tokens,
        use_max_tokens=True,
        # From the environment, never argv: the key a real engine would require.
        require_key=os.environ.get("MT_FAKE_ENGINE_KEY") or None,
    )
    try:
        asyncio.run(_serve(knobs, args.model, args.port, args.uds))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
