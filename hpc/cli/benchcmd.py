"""`mt bench`: concurrency sweeps against an engine or the gateway; `mt bench overhead`."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from hpc.cli.context import CliContext
from hpc.cli.output import stderr, stdout
from hpc.errors import MTError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bench.metrics import LevelSummary

OVERHEAD = "overhead"
BACKENDS = ("local", "slurm")


def _levels(value: str) -> tuple[int, ...]:
    from bench.overhead import parse_levels

    try:
        return parse_levels(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


class _ProgressLine:
    """One line on stderr, rewritten at most ten times a second (only on a terminal)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self._shown = 0.0

    def __call__(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.live and (force or now - self._shown >= 0.1):
            self._shown = now
            sys.stderr.write(f"\r\x1b[2K{text}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def bench(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(
            help="An OpenAI base URL (http://host:port/v1), a model name served by the "
            "gateway, or `overhead` for the gateway-overhead comparison.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(help="Levels, comma-separated (default 1,4,16,64; overhead: 1,16,64,256)."),
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(min=1, help="Requests per level (default 4 x concurrency, at least 16)."),
    ] = None,
    duration_s: Annotated[
        float | None, typer.Option("--duration-s", min=0.1, help="Seconds per level instead.")
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(min=0.001, help="Poisson arrivals at this many requests/s (default: none)."),
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length in words.")] = 128,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 64,
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream (SSE).")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and arrival times.")] = 0,
    model: Annotated[
        str | None, typer.Option(help="Model name with a URL target (default: the first listed).")
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(help="modelA,modelB: A/B through the gateway, requests interleaved."),
    ] = None,
    gateway_url: Annotated[
        str | None,
        typer.Option("--gateway", help="Gateway URL for model names (default: site's gateway)."),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            "--api-key-env",
            help="Environment variable holding the API key to send (default through the "
            "gateway: your own key, `mt keys owner`).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Directory for results.csv, results.json and the PNGs.")
    ] = Path("bench-results"),
    plot: Annotated[bool, typer.Option("--plot", help="Also write PNG charts.")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout-s", min=0.1, help="Timeout of one request.")
    ] = 300.0,
    engine_tokens_per_s: Annotated[
        float, typer.Option(help="overhead: the fake engine's tokens/s (0: as fast as it can).")
    ] = 0.0,
    engine_ttft_ms: Annotated[float, typer.Option(help="overhead: the fake engine's TTFT.")] = 0.0,
    paths: Annotated[
        str, typer.Option(help="overhead: which paths to measure.")
    ] = "direct,bare,mt,litellm",
    backend: Annotated[
        str,
        typer.Option(help="Where the load generator runs: local, or slurm (a job, via submitit)."),
    ] = "local",
    partition: Annotated[
        str | None, typer.Option(help="slurm: the partition (default: the site's).")
    ] = None,
    job_wait_s: Annotated[
        float,
        typer.Option(
            "--job-wait-s", min=1.0, help="slurm: how long to wait for the job (queue and run)."
        ),
    ] = 1800.0,
    rss_after: Annotated[
        int | None,
        typer.Option(
            "--rss-after",
            min=1,
            help="overhead: also send N requests through mt gateway, "
            "report its RSS before and after.",
        ),
    ] = None,
) -> None:
    """Measure throughput and latency (TTFT, ITL, end-to-end) at several concurrency levels."""
    levels = _levels(concurrency) if concurrency else None
    if target == OVERHEAD:
        _overhead(
            concurrency,
            requests,
            max_tokens,
            engine_tokens_per_s,
            engine_ttft_ms,
            paths,
            out,
            rss_after,
        )
        return
    if backend not in BACKENDS:
        raise typer.BadParameter(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if requests is not None and duration_s is not None:
        raise typer.BadParameter("give --requests or --duration-s, not both")
    from bench.endpoint import first_model
    from bench.loadgen import Progress, Target, sweep
    from bench.report import summaries, write_results
    from bench.workload import Schedule, Workload

    cli: CliContext = ctx.obj
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise MTError(
                f"--api-key-env {api_key_env}: that variable is not set",
                hint=f"export {api_key_env}=<key> (mt keys create prints one)",
            )
    gateway = gateway_url or _site_gateway(cli)
    if compare:
        models = tuple(m.strip() for m in compare.split(",") if m.strip())
        if len(models) < 2:
            raise typer.BadParameter("--compare needs two or more models: modelA,modelB")
        base_url = _v1(target) if target and _is_url(target) else _v1(gateway)
    elif target is None:
        raise typer.BadParameter("give a base URL or a model name (or --compare a,b)")
    elif _is_url(target):
        base_url = _v1(target)
        models = (model or first_model(base_url, api_key),)
    else:
        base_url, models = _v1(gateway), (target,)
    if api_key is None and base_url == _v1(gateway):
        api_key = _owner_key(cli)  # the bench runs here, as the gateway's owner

    workload = Workload(
        models=models,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        seed=seed,
    )
    schedule = Schedule(
        concurrency=levels or (1, 4, 16, 64),
        requests=requests,
        duration_s=duration_s,
        rate_per_s=rate,
        timeout_s=timeout_s,
    )
    line = _ProgressLine()

    def progress(p: Progress) -> None:
        total = f"/{p.total}" if p.total is not None else ""
        line(
            f"concurrency {p.concurrency}: {p.done}{total} requests, {p.errors} errors, "
            f"{p.elapsed_s:.1f} s"
        )

    import asyncio

    stderr().print(f"benchmarking {', '.join(models)} at {base_url}, levels {schedule.concurrency}")
    endpoint = Target(base_url, api_key)
    where: dict[str, object] = {"backend": backend}
    if backend == "slurm":
        from bench.slurmsweep import run_sweep_job

        stderr().print(f"submitting the sweep as a Slurm job (waiting up to {job_wait_s:.0f} s)")
        node, job = run_sweep_job(
            cli.site(), endpoint, workload, schedule, wait_s=job_wait_s, partition=partition
        )
        levels_done = node.levels
        where |= {
            "job_id": job.job_id,
            "node": node.slurmd_nodename,
            "hostname": node.hostname,
            "partition": job.partition,
        }
        stderr().print(
            f"job {job.job_id} ran on {node.slurmd_nodename} ({node.hostname}) "
            f"in {job.waited_s:.0f} s"
        )
    else:
        try:
            levels_done = asyncio.run(sweep(endpoint, workload, schedule, progress))
        finally:
            line.done()
    config = {
        **where,
        "base_url": base_url,
        "workload": asdict(workload),
        "schedule": {k: v for k, v in asdict(schedule).items() if k != "extra_headers"},
        "command": " ".join(["mt", *sys.argv[1:]]),
    }
    written = write_results(out, config, levels_done)
    rows = summaries(levels_done)
    if plot:
        from bench.plots import write_plots

        written += write_plots(out, rows)
    _print_table(rows)
    for path in written:
        stderr().print(f"wrote {path}")


def _print_table(rows: Sequence[LevelSummary]) -> None:
    table = Table(box=None, pad_edge=False)
    columns = ("MODEL", "CONC", "REQ", "ERR", "REQ/S", "OUT TOK/S", "TTFT p50/p99 ms")
    for column in (*columns, "ITL p50/p99 ms", "E2E p50/p90/p99 ms"):
        table.add_column(column, justify="left" if column == "MODEL" else "right")
    for row in rows:
        table.add_row(
            row.model,
            str(row.concurrency),
            str(row.requests),
            str(row.errors),
            f"{row.requests_per_s:.2f}",
            f"{row.output_tokens_per_s:.1f}",
            f"{_fmt(row.ttft_ms.p50)}/{_fmt(row.ttft_ms.p99)}",
            f"{_fmt(row.itl_ms.p50)}/{_fmt(row.itl_ms.p99)}",
            f"{_fmt(row.e2e_ms.p50)}/{_fmt(row.e2e_ms.p90)}/{_fmt(row.e2e_ms.p99)}",
        )
    stdout().print(table)


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _site_gateway(cli: CliContext) -> str:
    return cli.site().config.gateway.url(wildcard_as="127.0.0.1")  # the bench runs here


def _owner_key(cli: CliContext) -> str | None:
    """This user's gateway key (hpc.ownerkey), if `mt gateway` made one."""
    from hpc.ownerkey import owner_key_path, read_owner_key

    path = owner_key_path(cli.site().home)
    return read_owner_key(path) if path.exists() else None


def _overhead(
    concurrency: str | None,
    requests: int | None,
    max_tokens: int,
    engine_tokens_per_s: float,
    engine_ttft_ms: float,
    paths: str,
    out: Path,
    rss_after: int | None,
) -> None:
    from bench.loadgen import Progress
    from bench.overhead import (
        PATHS,
        OverheadConfig,
        markdown,
        run_overhead,
        write_overhead,
    )

    chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
    unknown = sorted(set(chosen) - set(PATHS))
    if unknown:
        raise typer.BadParameter(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
    config = OverheadConfig(
        concurrency=_levels(concurrency) if concurrency else (1, 16, 64, 256),
        requests=requests,
        max_tokens=max_tokens,
        engine_tokens_per_s=engine_tokens_per_s,
        engine_ttft_ms=engine_ttft_ms,
        paths=chosen,
        rss_after=rss_after,
    )
    line = _ProgressLine()

    def progress(path: str, p: Progress) -> None:
        line(f"concurrency {p.concurrency}, {path}: {p.done}/{p.total} requests")

    try:
        result = run_overhead(config, on_progress=progress)
    finally:
        line.done()
    command = " ".join(["mt", *sys.argv[1:]])
    written = write_overhead(out, result, command)
    stdout().print(markdown(result), markup=False, highlight=False)
    for path in written:
        stderr().print(f"wrote {path}")
