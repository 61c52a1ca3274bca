"""A bare aiohttp pass-through proxy: the floor under any aiohttp gateway's cost.

    python -m bench.bareproxy --upstream http://127.0.0.1:PORT [--port 0]

It forwards every request's method, path, body and ``Authorization`` header to the
upstream and relays the answer chunk by chunk, with nothing else: no auth, routing,
limits, metrics or logs. The overhead run measures it beside `mt gateway`, so that what
`mt gateway` adds over it is what its features cost. Prints ``bare proxy listening on URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
_FORWARDED = ("Authorization", "Content-Type", "Accept")


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the request upstream; stream the answer back as it arrives."""
    headers = {k: request.headers[k] for k in _FORWARDED if k in request.headers}
    url = request.app[UPSTREAM] + request.rel_url.path_qs
    async with request.app[SESSION].request(
        request.method, url, data=await request.read(), headers=headers
    ) as upstream:
        response = web.StreamResponse(status=upstream.status)
        response.content_type = upstream.content_type
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def create_app(upstream: str) -> web.Application:
    """The proxy to ``upstream`` (scheme, host and port; the request's path is kept)."""
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)  # as many upstream connections as clients
        async with aiohttp.ClientSession(connector=connector) as client:
            app[SESSION] = client
            yield

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def _serve(upstream: str, port: int) -> None:
    runner = web.AppRunner(create_app(upstream), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    sys.stdout.write(f"bare proxy listening on http://127.0.0.1:{bound}\n")
    sys.stdout.flush()
    try:
        await asyncio.Event().wait()  # until the process is terminated
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.bareproxy``: serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8000")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.upstream, args.port))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
