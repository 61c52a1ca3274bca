"""Run the gateway: ``start`` for tests and embedding, ``run`` for ``mt gateway``."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable, Mapping

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.fdlimit import ensure_fd_limit
from gateway.logs import LOGGER_NAME, configure_logging, fields
from gateway.ondemand.wait import ON_DEMAND
from gateway.protocol import GatewayRunner
from gateway.state import CONNECTIONS, INFLIGHT, METRICS
from hpc.backends import Backend
from hpc.errors import MTError

log = logging.getLogger(f"{LOGGER_NAME}.server")

_DRAIN_POLL_S = 0.05


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1; False for names and every other address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(config: GatewayConfig) -> None:
    """Refuse to listen beyond loopback without auth (anyone on the network could use it)."""
    if config.keys_file is None and not is_loopback(config.host):
        raise MTError(
            f"refusing to listen on {config.host} without API keys: anyone who can reach it "
            "could use every model",
            hint="pass --keys FILE or bind 127.0.0.1",
        )


async def start(
    config: GatewayConfig,
    *,
    env: Mapping[str, str] | None = None,
    backend: Backend | None = None,
) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner (``await runner.cleanup()`` stops it) and the port.

    Raises MTError for a refused bind or a port that cannot be had, and ConfigError when a
    config file is bad at startup.
    """
    check_bind(config)
    limit = ensure_fd_limit(config.max_in_flight)
    if (warning := limit.warning()) is not None:
        log.warning(warning, extra=fields(soft=limit.after, hard=limit.hard, needed=limit.needed))
    # The connection caps' defaults: what the open-file limit allows, and a quarter of
    # that for one address (docs/gateway.md, "Admission control and memory").
    total = config.max_connections or limit.connections
    per_client = config.max_connections_per_client
    config = config.model_copy(
        update={
            "max_connections": total,
            "max_connections_per_client": max(1, total // 4) if per_client is None else per_client,
        }
    )
    app = create_app(config, env=env, backend=backend)
    # On cleanup aiohttp stops listening first, then waits up to shutdown_timeout for the
    # requests in flight (streams included) before it cancels them: the graceful drain.
    # aiohttp's keep-alive timer runs from the connection's start until a whole request
    # head has arrived (and again while a keep-alive connection is idle): it is the header
    # read timeout, so a client that trickles its headers cannot hold a connection.
    # Its server counts connections against the caps and answers what aiohttp cannot parse
    # in OpenAI's shape (protocol.py).
    runner = GatewayRunner(
        app,
        connections=app[CONNECTIONS],
        retry_after_s=config.retry_after_s,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=config.shutdown_grace_s,
        keepalive_timeout=config.header_timeout_s,
    )
    try:
        await runner.setup()
    except BaseException:
        # Close whatever cleanup_ctx entries had started before the failing one.
        await app.cleanup()
        raise
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise MTError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
            hint="is another gateway running? pass --port, or --port 0 for any free port",
        ) from exc
    port = int(runner.addresses[0][1])
    return runner, port


def listening_line(host: str, port: int) -> str:
    """The line scripts wait for: ``mt gateway listening on http://HOST:PORT``."""
    shown = f"[{host}]" if ":" in host else host
    return f"mt gateway listening on http://{shown}:{port}"


def _announce(line: str) -> None:
    print(line, flush=True)


async def drain(runner: web.AppRunner, grace_s: float) -> None:
    """Stop accepting, let the requests in flight finish within ``grace_s``, end the rest
    (a stream with an in-band ``gateway_shutting_down`` error event, see ``inflight``), and
    clean up."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections take no new request
    app = runner.app
    metrics, inflight = app[METRICS], app[INFLIGHT]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    # Polled: this runs once, at shutdown, and keeps the request path free of it.
    while metrics.in_flight and loop.time() < deadline:
        await asyncio.sleep(min(_DRAIN_POLL_S, deadline - loop.time()))
    if (on_demand := app.get(ON_DEMAND)) is not None:
        on_demand.refuse_waiters()  # streams waiting for a cold start get an in-band error event
        await asyncio.sleep(_DRAIN_POLL_S)
    ended = inflight.end_all()
    if ended:
        log.info("grace over; ending requests", extra=fields(requests=ended))
    await runner.cleanup()


async def serve(
    config: GatewayConfig,
    announce: Callable[[str], None] = _announce,
    *,
    backend: Backend | None = None,
) -> None:
    """Listen until SIGINT or SIGTERM; then stop accepting, let the requests in flight
    finish within ``shutdown_grace_s``, end the rest, and return."""
    runner, port = await start(config, backend=backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        line = listening_line(config.host, port)
        log.info(line, extra=fields(host=config.host, port=port))
        announce(line)
        await stop.wait()
        log.info("shutting down", extra=fields(grace_s=config.shutdown_grace_s))
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await drain(runner, config.shutdown_grace_s)


def run(config: GatewayConfig, *, backend: Backend | None = None) -> None:
    """The blocking entry of ``mt gateway``: JSON logs on stderr, the listening line on stdout.

    ``backend`` is where on-demand models' jobs are submitted.

    Raises MTError (ConfigError included) when it cannot start; the CLI prints it.
    """
    configure_logging(sys.stderr)
    asyncio.run(serve(config, backend=backend))
