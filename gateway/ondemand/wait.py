"""The HTTP side of on-demand models: a request waits for its model's replicas, or is refused.

``await ready(...)`` answers with the model's ready replicas, starting its job first if
none is (the controller decides; this module only waits and speaks HTTP). While the job is
pending or starting, a streaming request already has its 200 and gets an SSE comment
(``: pending (Priority)``, ``: starting``) every ``on_demand_keepalive_s`` and on every
change, so proxies and clients keep the connection; the engine's answer then goes into the
same response. A non-streaming request waits up to the model's ``start_deadline_s`` and then
gets 503 + Retry-After with the state in the message. A refusal on a stream already started
is an in-band ``data: {"error": …}`` event with no ``[DONE]``; so is a gateway shutdown
whose grace ends before the job is ready (``OnDemandController.refuse_waiters``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import reply_response
from gateway.ondemand.controller import OnDemandController
from gateway.ondemand.jobs import Asker, ModelState
from gateway.ondemand.refusals import failed, not_on_demand, not_ready, shutting_down
from gateway.routes import Upstream
from gateway.state import RequestInfo
from hpc.openai import SSE_HEADERS, ErrorReply, error_event

ON_DEMAND = web.AppKey("on_demand", OnDemandController)


@dataclass(frozen=True, slots=True)
class Ready:
    """The model's ready replicas, and the client's stream if the wait opened it."""

    replicas: tuple[Upstream, ...]
    out: web.StreamResponse | None = None


async def ready(
    request: web.Request,
    controller: OnDemandController,
    state: ModelState,
    asker: Asker,
    candidates: tuple[Upstream, ...],
    stream: bool,
    info: RequestInfo,
) -> Ready | web.StreamResponse:
    """The model's ready replicas (``candidates`` are the route table's), once there are
    some; else the response that refuses the request (already sent, on a stream)."""
    replicas = controller.ready(state, candidates, asker)
    if replicas:
        return Ready(replicas)
    spec = controller.spec(state.name)
    if spec is None or spec.on_demand is None:
        return reply_response(not_on_demand(state.name, controller.config.retry_after_s))
    on_demand = spec.on_demand
    refused = controller.start(state, spec, asker)
    if refused is not None:
        return reply_response(refused)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + on_demand.start_deadline_s
    out: web.StreamResponse | None = None
    if stream:
        out = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await out.prepare(request)
    while True:
        replicas = state.upstreams()
        if replicas:
            return Ready(replicas, out)
        if controller.closing:
            return await refuse(out, shutting_down(controller.config.retry_after_s))
        refused = (
            failed(state, loop.time())
            if state.failure is not None
            else controller.start(state, spec, asker)  # the job ended under us
        )
        if refused is not None:
            return await refuse(out, refused)
        if out is not None:
            try:
                await out.write(f": {state.phase()}\n\n".encode())
            except ConnectionResetError:
                info.outcome = "client_disconnected"
                return out
        remaining = deadline - loop.time()
        if remaining <= 0:
            return await refuse(out, not_ready(state, on_demand, controller.config.retry_after_s))
        changed = state.changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                changed.wait(), min(controller.config.on_demand_keepalive_s, remaining)
            )


async def refuse(out: web.StreamResponse | None, reply: ErrorReply) -> web.StreamResponse:
    """The refusal's response, or, on a stream already started, its in-band error event."""
    if out is None:
        return reply_response(reply)
    await end_stream(out, reply.body())
    return out


async def end_stream(out: web.StreamResponse, body: bytes) -> None:
    """End a stream already started with an in-band error event (and no ``[DONE]``, so the
    client knows the answer is not whole); a client that left is no error."""
    with contextlib.suppress(ConnectionResetError):
        await out.write(error_event(body))
        await out.write_eof()


def on_demand_context(
    key: web.AppKey[OnDemandController],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry: adopt the gateway's jobs, then watch them until shutdown."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        controller = app[key]
        if controller.backend is None:
            yield
            return
        await controller.adopt()
        task = asyncio.create_task(controller.run(), name="mt-gateway-on-demand")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await controller.close()
        await controller.publish()

    return context
