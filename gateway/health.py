"""Active health checks: probe every job replica's health and load in the background.

Every ``health_interval_s`` the prober starts one probe per routed job replica (static
backends in ``models.yaml`` are judged by their answers alone, in ``balancer``) and stores
the result in the ``Balancer``; requests never wait for a probe. Probes run concurrently,
at most ``MAX_CONCURRENT_PROBES`` at once, each GET bounded by ``health_timeout_s``; a
replica whose last probe is still running is skipped that round, so a hung engine holds one
probe, never the others.

A probe is the engine's health endpoint, then its load where it exposes one, both with the
per-job key (engines that do not ask for it ignore it):

- health: the path the job wrapper published (``Record.health_path``, from
  ``hpc.job.engines``: vLLM and llama.cpp's ``llama-server`` ``/health``; llama-cpp-python's
  server has no ``/health`` and its ``/v1/models`` waits behind a generation, so
  ``/openapi.json``). Records written before that field existed say nothing: ``/health``
  is tried, and a 404 switches to ``/v1/models``.
- load: ``/metrics`` in Prometheus text, vLLM's ``vllm:num_requests_running`` /
  ``vllm:num_requests_waiting`` or llama-server's ``llamacpp:requests_processing`` /
  ``llamacpp:requests_deferred`` (only with ``--metrics``); for llama.cpp without them,
  ``/slots`` (slots processing count as running). An engine that has neither (404, 501, or
  no such series) is not asked again; a timeout or a 5xx is asked again next round. The
  parsing is ``hpc.job.engineload``'s, which the job wrapper's drain reads too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.balancer import Balancer
from gateway.config import GatewayConfig
from gateway.logs import LOGGER_NAME, fields
from gateway.reload import CleanupContext, Live
from gateway.routes import Upstream
from hpc.job.engineload import (
    ABSENT_STATUSES,
    EngineLoad,
    load_paths,
    parse_engine_load,
    parse_slots,
)
from hpc.tlspin import pinned_context

log = logging.getLogger(f"{LOGGER_NAME}.health")

MAX_CONCURRENT_PROBES = 32
# vLLM's /metrics with many histograms is a few hundred kB; anything past this is not it.
MAX_BODY_BYTES = 4 * 1024 * 1024
DEFAULT_HEALTH_PATH = "/health"
FALLBACK_HEALTH_PATH = "/v1/models"


def engine_root(base_url: str) -> str:
    """``http://node:port/v1`` → ``http://node:port``: health and metrics live at the root."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class _Absent(Exception):
    """The engine has no such endpoint (404/405/501)."""


@dataclass
class Prober:
    """Probes replicas and stores the results in ``balancer``; ``run`` loops until cancelled."""

    session: aiohttp.ClientSession
    balancer: Balancer
    live: Live
    interval_s: float
    timeout_s: float
    _running: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _health_paths: dict[str, str] = field(default_factory=dict, init=False)
    _load_paths: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False)
    _limit: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_PROBES), init=False
    )

    async def run(self) -> None:
        """A round every ``interval_s``: one probe per job replica not still being probed."""
        try:
            while True:
                self.start_round()
                await asyncio.sleep(self.interval_s)
        finally:
            for task in self._running.values():
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    def start_round(self) -> None:
        """Start this round's probes (without waiting for them) and forget gone replicas."""
        replicas = self.live.snapshot.routes.replicas()
        self.balancer.forget_idle(set(replicas))
        for cache in (self._health_paths, self._load_paths):
            for source in [s for s in cache if s not in replicas]:
                del cache[source]
        for source, upstream in replicas.items():
            if upstream.engine is None or source in self._running:
                continue
            task = asyncio.create_task(self._probe(upstream), name=f"mt-probe-{source}")
            self._running[source] = task
            task.add_done_callback(functools.partial(self._finished, source))

    def _finished(self, source: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(source, None)

    async def _probe(self, upstream: Upstream) -> None:
        async with self._limit:
            ok = await self._healthy(upstream)
            load = await self._load(upstream) if ok else None
        source = upstream.source
        was_ejected = self.balancer.ejected(source)
        self.balancer.probed(source, ok, load)
        now_ejected = self.balancer.ejected(source)
        if now_ejected and not was_ejected:
            log.warning(
                "replica ejected: its health probes keep failing",
                extra=fields(replica=source, model=upstream.model),
            )
        elif was_ejected and not now_ejected:
            log.info("replica healthy again", extra=fields(replica=source, model=upstream.model))

    async def _healthy(self, upstream: Upstream) -> bool:
        source = upstream.source
        path = self._health_paths.get(source) or upstream.health_path or DEFAULT_HEALTH_PATH
        try:
            status, _ = await self._get(upstream, path)
            if status == 404 and upstream.health_path is None and path == DEFAULT_HEALTH_PATH:
                # An older record of an engine without /health (llama-cpp-python's server).
                self._health_paths[source] = path = FALLBACK_HEALTH_PATH
                status, _ = await self._get(upstream, path)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            return False
        return status == 200

    async def _load(self, upstream: Upstream) -> EngineLoad | None:
        source = upstream.source
        paths = self._load_paths.get(source)
        if paths is None:
            paths = load_paths(upstream.engine or "")
        for index, path in enumerate(paths):
            try:
                load = await self._load_from(upstream, path)
            except _Absent:
                continue
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                # Unknown this time (an engine busy enough to be slow, say): ask again later.
                self._load_paths[source] = paths[index:]
                return None
            if load is not None:
                self._load_paths[source] = paths[index:]
                return load
        self._load_paths[source] = ()  # nothing to ask: least outstanding requests alone
        return None

    async def _load_from(self, upstream: Upstream, path: str) -> EngineLoad | None:
        status, body = await self._get(upstream, path)
        if status in ABSENT_STATUSES:
            raise _Absent(path)
        if status != 200:
            raise ValueError(f"{path}: HTTP {status}")
        if path == "/slots":
            return parse_slots(json.loads(body))
        load = parse_engine_load(body.decode("utf-8", "replace"))
        if load is None:
            raise _Absent(path)
        return load

    async def _get(self, upstream: Upstream, path: str) -> tuple[int, bytes]:
        # The body is read (bounded) even when only the status matters: a response read to
        # its end leaves the connection reusable for the next round.
        headers = {"Authorization": f"Bearer {upstream.api_key}"} if upstream.api_key else {}
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        url = engine_root(upstream.base_url) + path
        # A job's front is pinned: an impostor on its port gets no key (hpc.tlspin).
        tls = pinned_context(upstream.tls_sha256) if upstream.tls_sha256 else True
        get = self.session.get(url, headers=headers, timeout=timeout, ssl=tls)
        async with get as response:
            body = await response.content.read(MAX_BODY_BYTES + 1)
            while len(body) <= MAX_BODY_BYTES and not response.content.at_eof():
                more = await response.content.read(MAX_BODY_BYTES + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > MAX_BODY_BYTES:
                raise ValueError(f"{path}: answer larger than {MAX_BODY_BYTES} bytes")
            return response.status, body


def health_context(
    config: GatewayConfig, balancer_key: web.AppKey[Balancer], live_key: web.AppKey[Live]
) -> CleanupContext:
    """A ``cleanup_ctx`` entry: probe in the background from startup until shutdown.

    The prober has its own client session: a probe never takes a pooled connection a
    request could use, and its short timeouts are its own.
    """

    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=MAX_CONCURRENT_PROBES)
        async with aiohttp.ClientSession(connector=connector) as session:
            prober = Prober(
                session=session,
                balancer=app[balancer_key],
                live=app[live_key],
                interval_s=config.health_interval_s,
                timeout_s=config.health_timeout_s,
            )
            task = asyncio.create_task(prober.run(), name="mt-gateway-health")
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return context
