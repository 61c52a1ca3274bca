"""What a tunnel costs: time to first token and tokens/s directly vs. through each engine.

Opens one tunnel per engine (tunnels.engines, the code `mt tunnel` runs) to the gateway on
``--host``, then streams the same chat completion ``--requests`` times over each path,
interleaved (direct, openssh, paramiko, direct, …) so that drift in the engine's speed hits
every path alike. Prints one table row per path: median and p90 time to first token, and
median tokens/s after the first token (one SSE chunk is one token for llama.cpp and vLLM).

    python bench/tunnel_overhead.py --host login --remote-port 8081 \\
        --direct-url http://127.0.0.1:8081 --model gemma-3-270m

``--direct-url`` must reach the same gateway without a tunnel (run it on the login node, or
on a machine where the gateway is local); ``--ssh-config``/``--known-hosts``/``--identity``
are passed to both engines as to `mt tunnel`.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunnels.base import TunnelSpec
from tunnels.engines import make_engine
from tunnels.health import check_healthz


@dataclass
class PathStats:
    """Measurements of one path (direct, or one engine)."""

    name: str
    ttft_ms: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)

    def row(self) -> str:
        """``| path | median TTFT | p90 TTFT | median tok/s |``."""
        ttft = sorted(self.ttft_ms)
        p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
        return (
            f"| {self.name} | {statistics.median(ttft):.1f} | {p90:.1f} | "
            f"{statistics.median(self.tokens_per_s):.1f} |"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def tunnel(engine: str, args: argparse.Namespace) -> Iterator[str]:
    """One open tunnel of ``engine`` to the gateway; yields its local base URL."""
    spec = TunnelSpec(
        host=args.host,
        local_port=_free_port(),
        remote_port=args.remote_port,
        jump=args.jump,
        identity=args.identity,
        known_hosts=args.known_hosts,
        ssh_config=args.ssh_config,
    )
    engine_ = make_engine(engine, spec, lambda line: print(f"{engine}: {line}", file=sys.stderr))
    engine_.open()
    try:
        check_healthz(spec)
        yield spec.url
    finally:
        engine_.close()


def one_request(client: Any, model: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token in ms, tokens/s after it) for one streamed chat completion."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a short story about a lighthouse."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = now if first is None else first
            tokens += 1
    ended = time.perf_counter()
    if first is None or tokens < 2:
        raise RuntimeError("the engine streamed fewer than two tokens")
    return (first - started) * 1000, (tokens - 1) / (ended - first)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, open the tunnels, measure, print the table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="login node: ssh alias or [user@]host")
    parser.add_argument("--remote-port", type=int, default=8081)
    parser.add_argument("--direct-url", required=True, help="the same gateway, no tunnel")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engines", default="openssh,paramiko")
    parser.add_argument("--jump")
    parser.add_argument("--identity", type=Path)
    parser.add_argument("--known-hosts", type=Path)
    parser.add_argument("--ssh-config", type=Path)
    args = parser.parse_args(argv)

    import openai

    with ExitStack() as stack:
        urls = {"direct": args.direct_url.rstrip("/")}
        for engine in args.engines.split(","):
            urls[engine] = stack.enter_context(tunnel(engine, args))
        clients = {
            name: openai.OpenAI(base_url=url + "/v1", api_key=args.api_key, max_retries=0)
            for name, url in urls.items()
        }
        stats = {name: PathStats(name) for name in urls}
        for client in clients.values():  # warm-up: connections, the engine's caches
            one_request(client, args.model, 8)
        for _ in range(args.requests):
            for name, client in clients.items():
                ttft, rate = one_request(client, args.model, args.max_tokens)
                stats[name].ttft_ms.append(ttft)
                stats[name].tokens_per_s.append(rate)
    print(f"{args.requests} streamed chat completions per path, max_tokens={args.max_tokens}")
    print("| path | TTFT median (ms) | TTFT p90 (ms) | tokens/s median |")
    print("| --- | --- | --- | --- |")
    for path in stats.values():
        print(path.row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
