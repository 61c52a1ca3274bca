"""A fake inference engine for gateway tests.

It stands for the OpenAI-compatible server of vLLM (``vllm serve``) or llama.cpp
(``llama-server`` / ``llama_cpp.server``) that a ModelTainer job runs, and speaks the same
wire format: ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``,
JSON answers, and for ``"stream": true`` Server-Sent Events ``data: {...}\\n\\n`` ending
with ``data: [DONE]\\n\\n``; it requires ``Authorization: Bearer <job key>`` as the real
engines do when started with an API key.

It is a real aiohttp app on 127.0.0.1, port 0. Its behaviour is set by ``Knobs`` when it
is made (no module globals), and ``Seen`` counts what it received, including requests
whose client went away before the answer was done (a real engine aborts those).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


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


@dataclass
class Seen:
    """What the fake received and did."""

    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    authorization: list[str | None] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    first_chunk_at: float | None = None  # time.monotonic() of the first streamed chunk
    last_chunk_at: float | None = None  # ... and of the last one
    cancelled_event: asyncio.Event = field(default_factory=asyncio.Event)


class FakeUpstream:
    """An OpenAI-compatible engine on 127.0.0.1:<ephemeral port>; use ``async with``."""

    def __init__(self, knobs: Knobs | None = None, model: str = "fake-model") -> None:
        self.knobs = knobs or Knobs()
        self.model = model
        self.seen = Seen()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI root, as a registry record holds it."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeUpstream:
        app = web.Application()
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            app.router.add_post(path, self._handle)
        app.router.add_get("/health", self._health)
        # handler_cancellation: like the real engines, notice a client that left at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.requests += 1
        self.seen.authorization.append(request.headers.get("Authorization"))
        self.seen.request_ids.append(request.headers.get("X-Request-Id"))
        body = await request.read()
        self.seen.bodies.append(body)
        knobs = self.knobs
        if self.seen.requests <= knobs.drop_requests:
            # Like an engine that crashed or closed an idle keep-alive connection.
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        if knobs.require_key is not None and (
            request.headers.get("Authorization") != f"Bearer {knobs.require_key}"
        ):
            return _error(401, "invalid api key", "authentication_error")
        if knobs.status != 200:
            if knobs.raw_error is not None:
                return web.Response(status=knobs.status, body=knobs.raw_error)
            return _error(knobs.status, f"fake engine answers {knobs.status}", "server_error")
        payload = json.loads(body)
        cut = False
        try:
            if payload.get("stream") is True and not request.path.endswith("/embeddings"):
                response, cut = await self._stream(request, payload)
                return response
            await asyncio.sleep(knobs.ttft_s + self._generation_s())
            self.seen.completed += 1
            return web.json_response(self._answer(request.path, payload))
        except (asyncio.CancelledError, ConnectionResetError):
            # A deliberate cut aborts our own transport; only count clients that left.
            if not cut:
                self.seen.cancelled += 1
                self.seen.cancelled_event.set()
            raise

    def _generation_s(self) -> float:
        rate = self.knobs.tokens_per_s
        return self.knobs.tokens / rate if rate > 0 else 0.0

    async def _stream(
        self, request: web.Request, payload: dict[str, Any]
    ) -> tuple[web.StreamResponse, bool]:
        knobs = self.knobs
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)  # headers go out at once, as vLLM's do
        await asyncio.sleep(knobs.ttft_s)
        gap = 1 / knobs.tokens_per_s if knobs.tokens_per_s > 0 else 0.0
        chat = request.path.endswith("/chat/completions")
        for index in range(knobs.tokens):
            if index:
                await asyncio.sleep(gap)
            if knobs.cut_after is not None and index >= knobs.cut_after:
                assert request.transport is not None
                request.transport.abort()
                return response, True
            last = index == knobs.tokens - 1
            chunk = _chunk(self.model, chat, f"tok{index} ", "stop" if last else None)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            now = time.monotonic()
            if self.seen.first_chunk_at is None:
                self.seen.first_chunk_at = now
            self.seen.last_chunk_at = now
        if not knobs.omit_done:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        self.seen.completed += 1
        return response, False

    def _answer(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        created = int(time.time())
        text = "".join(f"tok{i} " for i in range(self.knobs.tokens))
        usage = {"prompt_tokens": 1, "completion_tokens": self.knobs.tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if path.endswith("/embeddings"):
            return {
                "object": "list",
                "model": self.model,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        if path.endswith("/chat/completions"):
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            kind = "text_completion"
        return {
            "id": "cmpl-fake",
            "object": kind,
            "created": created,
            "model": payload.get("model", self.model),
            "choices": [choice],
            "usage": usage,
        }


def _chunk(model: str, chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish}
        kind = "text_completion"
    return {
        "id": "cmpl-fake",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def _error(status: int, message: str, type_: str) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": status}}
    return web.json_response(body, status=status)
