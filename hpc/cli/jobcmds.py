"""`mt submit`, `mt status`, `mt logs`, `mt cancel`: jobs and their records."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hpc import jobs, waiting
from hpc.backends import JobHandle, JobStatus
from hpc.chain import describe
from hpc.cli.context import CliContext
from hpc.cli.output import age, print_json, stderr, stdout
from hpc.cli.phasesview import print_phases
from hpc.cli.remote import run_there
from hpc.errors import JobNotFoundError
from hpc.registry import Record, record_key
from hpc.spec import ModelSpec, PoolSpec
from hpc.toolcalls import missing_tool_flags

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _progress_line(record: Record | None, status: JobStatus) -> str:
    state = record.state if record else "submitted"
    if state == "pending" and status.state == "pending" and status.reason:
        return f"pending ({status.reason})"
    if state == "pending" and status.state == "running":
        return "starting (job running, engine not started yet)"
    return state


def _warn_tool_flags(specs: Iterable[ModelSpec]) -> None:
    """A ``warning:`` line on stderr for each chat model started without tool calling."""
    for spec in specs:
        problem = missing_tool_flags(spec)
        if problem is not None:
            stderr().print(f"warning: {problem}", soft_wrap=True, markup=False, highlight=False)


def submit(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A model or swap pool name from models.yaml.")],
    backend: Annotated[
        str | None, typer.Option("--backend", "-b", help="local (default), or a site backend.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Wait until the model is ready.")
    ] = False,
    timeout_s: Annotated[
        float | None, typer.Option("--timeout", help="Give up waiting after this many seconds.")
    ] = None,
    queue_timeout_s: Annotated[
        float | None,
        typer.Option(
            "--queue-timeout",
            min=0,
            help="Cancel the job (and wait no more) if it is still pending in the "
            "scheduler's queue after this many seconds; implies --wait.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the job script instead of submitting it.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a job that serves MODEL (or swap pool); with --wait, show its progress until ready."""
    run_there(ctx, send_models=True)
    cli: CliContext = ctx.obj
    site = cli.site()
    pool = cli.models().pool(model) if cli.has_models() else None
    if pool is not None:
        _warn_tool_flags(cli.models().catalogue(pool))
        if dry_run:
            typer.echo(jobs.render_pool_script(site, cli.models(), pool, backend), nl=False)
            return
        handle = jobs.submit_pool(site, cli.models(), pool, backend)
    else:
        spec = cli.spec(model)
        _warn_tool_flags((spec,))
        if dry_run:
            typer.echo(jobs.render_script(site, spec, backend), nl=False)
            return
        handle = jobs.submit(site, spec, backend)
    err = stderr()
    if not as_json:
        key = f"{handle.backend}-{handle.job_id}"
        err.print(f"submitted {model} as job [bold]{key}[/] ({handle.backend})")
    if not wait and queue_timeout_s is None:
        if as_json:
            print_json(
                {
                    "backend": handle.backend,
                    "job_id": handle.job_id,
                    "key": record_key(handle.backend, handle.job_id),
                    "nonce": handle.nonce,
                    "model": model,
                    "state": "pending",
                }
            )
        else:
            err.print(f"follow it with: mt status  ·  mt logs -f {handle.backend}-{handle.job_id}")
        return
    record = _wait(cli, handle, quiet=as_json, timeout_s=timeout_s, queue_timeout_s=queue_timeout_s)
    if as_json:
        print_json(record.public())
    else:
        stdout().print(f"[green]ready[/] {record.model} at {record.base_url}  (job {record.key})")


def _wait(
    cli: CliContext,
    handle: JobHandle,
    *,
    quiet: bool,
    timeout_s: float | None,
    queue_timeout_s: float | None,
) -> Record:
    err = stderr()
    started = time.monotonic()
    last_line: list[str] = []

    if quiet or not err.is_terminal:

        def on_poll(record: Record | None, status: JobStatus) -> None:
            line = _progress_line(record, status)
            if not quiet and line not in last_line:
                last_line.append(line)
                err.print(f"{time.monotonic() - started:6.1f}s  {line}")

        return waiting.wait_ready(
            cli.site(),
            handle,
            timeout_s=timeout_s,
            queue_timeout_s=queue_timeout_s,
            on_poll=on_poll,
        )

    with err.status("submitted") as spinner:

        def on_poll_live(record: Record | None, status: JobStatus) -> None:
            line = _progress_line(record, status)
            if line not in last_line:
                last_line.append(line)
                err.print(f"{time.monotonic() - started:6.1f}s  {line}")
            spinner.update(f"{line}  [dim]{time.monotonic() - started:.0f}s elapsed[/]")

        try:
            return waiting.wait_ready(
                cli.site(),
                handle,
                timeout_s=timeout_s,
                queue_timeout_s=queue_timeout_s,
                on_poll=on_poll_live,
            )
        except KeyboardInterrupt:
            key = f"{handle.backend}-{handle.job_id}"
            err.print(f"stopped waiting; job {key} keeps running (mt cancel {key} stops it)")
            raise typer.Exit(130) from None


def status(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Include jobs that are gone.")
    ] = False,
    phases: Annotated[
        bool,
        typer.Option(
            "--phases",
            help="Show where each job's start-up time went: queued (with the scheduler's "
            "reason), staging (bytes, MB/s), engine start to healthy, first token.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List jobs: model, backend, job, state, endpoint, age."""
    run_there(ctx)
    cli: CliContext = ctx.obj
    views = jobs.job_views(cli.site())
    if not show_all:
        views = [v for v in views if v.record.state != "gone"]
    if phases:
        print_phases(views, as_json=as_json)
        return
    if as_json:
        print_json(
            [
                {
                    **v.record.public(),
                    "scheduler": {"state": v.scheduler.state, "reason": v.scheduler.reason},
                }
                for v in views
            ]
        )
        return
    if not views:
        stderr().print("no jobs" + ("" if show_all else " (mt status --all shows ended ones)"))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "BACKEND", "JOB", "STATE", "ENDPOINT", "AGE"):
        table.add_column(column)
    now = time.time()
    for view in views:
        r = view.record
        state: str = r.state
        unknown = view.scheduler.state == "unknown"
        if r.state == "pending" and view.scheduler.reason and not unknown:
            state += f" ({view.scheduler.reason})"
        if r.state == "failed" and r.reason:
            state += f": {r.reason}"
        if unknown and view.scheduler.reason:  # what could not be asked, and why
            state += f" (unknown: {view.scheduler.reason})"
        handover = describe(r)  # continuity: handover: this job's place in its chain
        if handover is not None:
            state += f", {handover}"
        table.add_row(r.model, r.backend, r.key, state, r.base_url or "-", age(r.created_at, now))
    stdout().print(table)


def logs(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job id or key (see mt status).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
) -> None:
    """Print a job's log (the engine's output, with its key masked)."""
    run_there(ctx)
    cli: CliContext = ctx.obj
    record = jobs.find_record(cli.site(), job)
    try:
        for line in jobs.service(cli.site(), record.backend).logs(
            jobs.handle_of(record), follow=follow
        ):
            typer.echo(line)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def cancel(
    ctx: typer.Context,
    job: Annotated[
        str,
        typer.Argument(
            help="Job id or key (see mt status), or a model name: all its jobs. A job of a "
            "handover chain ends with the whole chain."
        ),
    ],
    as_json: JsonOpt = False,
) -> None:
    """Stop a job: its engine drains and stops, its record becomes gone."""
    run_there(ctx)
    cli: CliContext = ctx.obj
    try:
        record = jobs.cancel(cli.site(), job)
    except JobNotFoundError:
        records = jobs.cancel_model(cli.site(), job)  # a model name: a list of its jobs
        if as_json:
            print_json([r.public() for r in records])
        else:
            for each in records:
                stdout().print(f"{each.key}: {each.state}")
        return
    if as_json:
        print_json(record.public())
    else:
        stdout().print(f"{record.key}: {record.state}")


def render(
    ctx: typer.Context,
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model name(s), or one swap pool, from models.yaml (kubernetes: several, "
            "pools among them)."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write here (default: MODEL.sbatch, or MODEL-k8s/ for kubernetes).",
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", "-b", help="slurm (default) or kubernetes.")
    ] = "slurm",
    gateway_replicas: Annotated[
        int | None,
        typer.Option(
            "--gateway-replicas",
            min=1,
            max=100,
            help="kubernetes: gateway replicas (default: site.yaml kubernetes.gateway.replicas).",
        ),
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            help="kubernetes: the gateway's keys.yaml (default $MT_HOME/keys.yaml, "
            "made by `mt keys create`).",
        ),
    ] = None,
) -> None:
    """Write MODEL's (or a swap pool's) job script (slurm) or kustomize directory (kubernetes:
    the gateway in front, NetworkPolicies, monitoring, one directory per model)."""
    cli: CliContext = ctx.obj
    if backend == "kubernetes":
        _render_kubernetes(cli, models, output, gateway_replicas, keys)
        return
    pool = cli.models().pool(models[0]) if cli.has_models() else None
    if pool is not None:
        _render_pool(cli, pool, models, output, backend)
        return
    specs = [cli.spec(name) for name in models]
    if len(specs) != 1:
        raise typer.BadParameter("the slurm backend renders one model at a time")
    spec = specs[0]
    script = jobs.render_script(cli.site(), spec, backend)
    path = output or Path(f"{spec.name}.sbatch")
    path.write_text(script, encoding="utf-8")
    stderr().print(
        f"wrote {path}; submit it with `sbatch {path}` — the job registers its endpoint itself"
    )


def _render_kubernetes(
    cli: CliContext,
    names: list[str],
    output: Path | None,
    gateway_replicas: int | None,
    keys: Path | None,
) -> None:
    from hpc.k8s.clientkeys import read_client_keys
    from hpc.k8s.kustomize import layout_tree, write_tree
    from hpc.ownerkey import new_key
    from hpc.registry import new_api_key

    site = cli.site()
    pools = [(p, cli.models().catalogue(p)) for n in names if (p := _pool_named(cli, n))]
    pool_names = {pool.name for pool, _ in pools}
    specs = [cli.spec(name) for name in names if name not in pool_names]
    k8s = site.config.kubernetes
    if gateway_replicas is not None:
        gateway = k8s.gateway.model_copy(update={"replicas": gateway_replicas})
        k8s = k8s.model_copy(update={"gateway": gateway})
    files = layout_tree(
        specs,
        api_keys={name: new_api_key() for name in names},
        client_keys=read_client_keys(keys or site.keys_file),
        metrics_token=new_key(),
        site=k8s,
        pools=pools,
    )
    directory = output or Path(f"{names[0]}-k8s" if len(names) == 1 else "k8s")
    write_tree(directory, files)
    stderr().print(
        f"wrote {len(files)} files to {directory}/; apply them with "
        f"`kubectl apply -k {directory}` (the secret.yaml files hold keys and are gitignored)"
    )


def _pool_named(cli: CliContext, name: str) -> PoolSpec | None:
    return cli.models().pool(name) if cli.has_models() else None


def _render_pool(
    cli: CliContext, pool: PoolSpec, names: list[str], output: Path | None, backend: str
) -> None:
    """A swap pool's sbatch script: the one `mt submit POOL --dry-run` prints."""
    if len(names) != 1:
        raise typer.BadParameter(f"a swap pool ({pool.name}) is rendered alone")
    script = jobs.render_pool_script(cli.site(), cli.models(), pool, backend)
    path = output or Path(f"{pool.name}.sbatch")
    path.write_text(script, encoding="utf-8")
    stderr().print(
        f"wrote {path}; submit it with `sbatch {path}` — the pool registers its endpoint itself"
    )
