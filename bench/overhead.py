"""Gateway overhead: the same streaming workload directly against a fast fake engine, through
a bare aiohttp proxy, through `mt gateway`, and through LiteLLM's proxy when it is
installed, level by level, in one run; optionally `mt gateway`'s RSS after N more requests.

    python -m bench.overhead [--concurrency 1,16,64,256] [--rss-after 10000] [--out DIR]
    mt bench overhead [same options]

The fake engine (``bench.fakeengine``, its own process) answers at full speed unless told
otherwise, so what is left is the proxies' own cost. The bare proxy (``bench.bareproxy``)
only relays: the floor under any aiohttp gateway. `mt gateway` runs as a user runs it: a
keys file (auth on) whose key has a model list and rate limits set far above what the run
sends (so they are checked on every request but never trigger), a static route to the
engine, metrics, and JSON access logs (to a file). LiteLLM's proxy (``litellm[proxy]``,
optional) routes the same model name to the same engine. At each level the paths take
turns, each after a warm-up round. Reported per path and level: p50/p99 end-to-end and
TTFT, their overhead over the direct path, text chunks per second, errors, and the proxy
process tree's CPU seconds and peak RSS. With ``--rss-after N``, N more streaming requests
then go through `mt gateway`, and its RSS is reported fresh, before them and after them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from bench.loadgen import Progress, Target, run_level
from bench.metrics import LevelSummary
from bench.overheadservers import (
    MODEL,
    litellm_missing,
    start_bare,
    start_engine,
    start_litellm,
    start_mt_gateway,
)
from bench.proxyproc import ServerProcess, UsageMeter
from bench.report import environment
from bench.workload import Schedule, Workload

PATHS = ("direct", "bare", "mt", "litellm")
_MIB = 1024 * 1024
_RSS_CONCURRENCY = 16


@dataclass(frozen=True)
class OverheadConfig:
    """The overhead run's settings."""

    concurrency: tuple[int, ...] = (1, 16, 64, 256)
    requests: int | None = None  # per level and path; default 2 x concurrency, at least 32
    max_tokens: int = 64
    prompt_tokens: int = 32
    engine_tokens_per_s: float = 0.0  # 0: the fake engine streams as fast as it can
    engine_ttft_ms: float = 0.0
    paths: tuple[str, ...] = PATHS
    seed: int = 0
    rss_after: int | None = None  # then send this many requests through mt, RSS around them

    def requests_for(self, concurrency: int) -> int:
        """Measured requests of one level and path."""
        return self.requests if self.requests is not None else max(32, 2 * concurrency)


@dataclass(frozen=True)
class PathLevel:
    """One path at one level."""

    path: str
    concurrency: int
    summary: LevelSummary
    proxy_cpu_s: float | None
    proxy_peak_rss_mib: float | None
    first_error: str | None = None  # status and message of the first failed request


@dataclass(frozen=True)
class RssCheck:
    """`mt gateway`'s resident memory around ``requests`` more requests."""

    requests: int
    errors: int
    concurrency: int
    fresh_mib: float  # just after it started, before any request
    before_mib: float  # after the overhead levels, before these requests
    after_mib: float
    peak_mib: float


@dataclass
class OverheadResult:
    """The whole run: rows per path and level, and notes (a path that was skipped, and why)."""

    config: OverheadConfig
    rows: list[PathLevel] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rss: RssCheck | None = None
    mt_fresh_rss_bytes: int = 0

    def row(self, path: str, concurrency: int) -> PathLevel | None:
        """The row of ``path`` at ``concurrency``, if it was measured."""
        return next((r for r in self.rows if r.path == path and r.concurrency == concurrency), None)


async def _measure(
    config: OverheadConfig,
    targets: dict[str, tuple[Target, ServerProcess | None]],
    result: OverheadResult,
    on_progress: Callable[[str, Progress], None] | None,
) -> None:
    workload = Workload(
        models=(MODEL,),
        prompt_tokens=config.prompt_tokens,
        max_tokens=config.max_tokens,
        seed=config.seed,
    )
    limit = max(config.concurrency)
    # One client connection pool per path, so no path reuses another's connections.
    sessions = {
        path: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit)) for path in targets
    }
    try:
        for level in config.concurrency:
            for path, (target, server) in targets.items():
                schedule = Schedule(
                    concurrency=(level,), requests=config.requests_for(level), warmup=level
                )

                def progress(p: Progress, path: str = path) -> None:
                    if on_progress is not None:
                        on_progress(path, p)

                async with UsageMeter(server) as meter:
                    done = await run_level(
                        sessions[path], target, workload, schedule, level, progress
                    )
                usage = meter.usage if server is not None else None
                failed = next((r for r in done.records if not r.ok), None)
                result.rows.append(
                    PathLevel(
                        path=path,
                        concurrency=level,
                        summary=done.summaries[0],
                        proxy_cpu_s=usage.cpu_s if usage else None,
                        proxy_peak_rss_mib=usage.peak_rss_bytes / _MIB if usage else None,
                        first_error=f"{failed.status}: {failed.error}" if failed else None,
                    )
                )
        mt_target, mt_server = targets.get("mt", (None, None))
        if config.rss_after and mt_target is not None and mt_server is not None:
            result.rss = await _rss_check(
                config.rss_after, workload, mt_target, mt_server, result.mt_fresh_rss_bytes
            )
    finally:
        for session in sessions.values():
            await session.close()


async def _rss_check(
    total: int, workload: Workload, target: Target, server: ServerProcess, fresh_bytes: int
) -> RssCheck:
    """Send ``total`` more requests through `mt gateway`; its RSS around them."""
    schedule = Schedule(concurrency=(_RSS_CONCURRENCY,), requests=total)
    before = server.rss_bytes()
    connector = aiohttp.TCPConnector(limit=_RSS_CONCURRENCY)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        UsageMeter(server, interval_s=0.5) as meter,
    ):
        done = await run_level(session, target, workload, schedule, _RSS_CONCURRENCY)
    await asyncio.sleep(1.0)  # let the last connections close
    return RssCheck(
        requests=total,
        errors=done.summaries[0].errors,
        concurrency=_RSS_CONCURRENCY,
        fresh_mib=fresh_bytes / _MIB,
        before_mib=before / _MIB,
        after_mib=server.rss_bytes() / _MIB,
        peak_mib=meter.usage.peak_rss_bytes / _MIB,
    )


def run_overhead(
    config: OverheadConfig,
    workdir: Path | None = None,
    on_progress: Callable[[str, Progress], None] | None = None,
) -> OverheadResult:
    """Start the engine and the proxies, measure every path at every level, stop them all."""
    result = OverheadResult(config)
    unknown = set(config.paths) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown paths {sorted(unknown)}; known: {', '.join(PATHS)}")
    with tempfile.TemporaryDirectory(prefix="mt-overhead-") as tmp:
        work = workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        servers: list[ServerProcess] = []
        try:
            engine = start_engine(
                config.max_tokens, config.engine_tokens_per_s, config.engine_ttft_ms, work
            )
            servers.append(engine)
            targets: dict[str, tuple[Target, ServerProcess | None]] = {}
            if "direct" in config.paths:
                targets["direct"] = (Target(engine.url), None)
            if "bare" in config.paths:
                bare = start_bare(engine.url, work)
                servers.append(bare)
                targets["bare"] = (Target(bare.url + "/v1"), bare)
            if "mt" in config.paths:
                gateway, key = start_mt_gateway(engine.url, work)
                servers.append(gateway)
                result.mt_fresh_rss_bytes = gateway.rss_bytes()
                targets["mt"] = (Target(gateway.url + "/v1", api_key=key), gateway)
            elif config.rss_after:
                result.notes.append("--rss-after skipped: the mt path is not measured")
            if "litellm" in config.paths:
                missing = litellm_missing()
                if missing is not None:
                    result.notes.append(f"litellm skipped: {missing}")
                else:
                    proxy, master_key = start_litellm(engine.url, work)
                    servers.append(proxy)
                    targets["litellm"] = (Target(proxy.url + "/v1", api_key=master_key), proxy)
            asyncio.run(_measure(config, targets, result, on_progress))
        finally:
            for server in reversed(servers):
                server.stop()
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _over(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value - base:+.1f}"


def table_rows(result: OverheadResult) -> list[dict[str, str]]:
    """One row per level and path, formatted, in the order of the Markdown table."""
    rows = []
    for row in result.rows:
        direct = result.row("direct", row.concurrency)
        base = direct.summary.e2e_ms if direct else None
        s = row.summary
        rows.append(
            {
                "concurrency": str(row.concurrency),
                "path": row.path,
                "e2e p50 ms": _ms(s.e2e_ms.p50),
                "e2e p99 ms": _ms(s.e2e_ms.p99),
                "overhead p50 ms": _over(s.e2e_ms.p50, base.p50 if base else None)
                if row.path != "direct"
                else "",
                "overhead p99 ms": _over(s.e2e_ms.p99, base.p99 if base else None)
                if row.path != "direct"
                else "",
                "TTFT p50 ms": _ms(s.ttft_ms.p50),
                "chunks/s": f"{s.chunks_per_s:,.0f}",
                "errors": f"{s.errors}/{s.requests}",
                "proxy CPU s": "" if row.proxy_cpu_s is None else f"{row.proxy_cpu_s:.2f}",
                "proxy peak RSS MiB": ""
                if row.proxy_peak_rss_mib is None
                else f"{row.proxy_peak_rss_mib:.0f}",
            }
        )
    return rows


def markdown(result: OverheadResult) -> str:
    """The Markdown table for docs/benchmarks.md, with the notes under it."""
    rows = table_rows(result)
    if not rows:
        return "(nothing measured)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    if result.rss is not None:
        lines += ["", rss_markdown(result.rss)]
    lines += [f"\n{note}" for note in result.notes]
    return "\n".join(lines) + "\n"


def rss_markdown(rss: RssCheck) -> str:
    """The RSS check as a small Markdown table."""
    return (
        f"`mt gateway` RSS around {rss.requests:,} more streaming requests "
        f"(concurrency {rss.concurrency}, {rss.errors} errors):\n\n"
        "| fresh MiB | before MiB | after MiB | peak MiB | after - before MiB |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"| {rss.fresh_mib:.1f} | {rss.before_mib:.1f} | {rss.after_mib:.1f} "
        f"| {rss.peak_mib:.1f} | {rss.after_mib - rss.before_mib:+.1f} |"
    )


def write_overhead(out_dir: Path, result: OverheadResult, command: str) -> list[Path]:
    """``overhead.json`` (config, environment, every row) and ``overhead.md`` (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        "config": asdict(result.config),
        "environment": environment(),
        "notes": result.notes,
        "rows": [asdict(row) for row in result.rows],
        "rss_after": asdict(result.rss) if result.rss is not None else None,
    }
    json_path = out_dir / "overhead.json"
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / "overhead.md"
    md_path.write_text(f"```console\n{command}\n```\n\n{markdown(result)}", encoding="utf-8")
    return [json_path, md_path]


def parse_levels(text: str) -> tuple[int, ...]:
    """``"1,16,64"`` → ``(1, 16, 64)``; every level a positive integer."""
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.overhead``: run, write overhead.json/.md under --out, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engine-tokens-per-s", type=float, default=0.0)
    parser.add_argument("--engine-ttft-ms", type=float, default=0.0)
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument(
        "--rss-after", type=int, default=None, help="then N requests through mt; its RSS"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/overhead"))
    args = parser.parse_args(argv)
    config = OverheadConfig(
        concurrency=parse_levels(args.concurrency),
        requests=args.requests,
        max_tokens=args.max_tokens,
        engine_tokens_per_s=args.engine_tokens_per_s,
        engine_ttft_ms=args.engine_ttft_ms,
        paths=tuple(p.strip() for p in args.paths.split(",") if p.strip()),
        rss_after=args.rss_after,
    )

    def progress(path: str, p: Progress) -> None:
        total = f"/{p.total}" if p.total is not None else ""
        sys.stderr.write(f"\r  c={p.concurrency:<4} {path:<8} {p.done}{total} done   ")

    result = run_overhead(config, on_progress=progress)
    sys.stderr.write("\n")
    command = "python -m bench.overhead " + " ".join(sys.argv[1:] if argv is None else argv)
    write_overhead(args.out, result, command.strip())
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
