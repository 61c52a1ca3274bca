"""`mt pool status`: what each swap pool has loaded, what is idle, what started on demand."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from hpc.cli.context import CliContext
from hpc.cli.output import age, print_json, stderr, stdout
from hpc.cli.remote import run_there
from hpc.poolstatus import OnDemandView, PoolView, pool_report

pool_app = typer.Typer(help="Swap pools and models started on demand.", no_args_is_help=True)


def _seconds(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return f"{value:.1f}s" if value < 60 else age(0, float(value))


def _pool_title(view: PoolView) -> str:
    record = view.record
    return f"pool {record.model}  {record.key}  {record.state}  {record.base_url or '-'}"


def _pool_table(view: PoolView) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("SLOT", "GPUS", "MODEL", "STATE", "IN FLIGHT", "IDLE", "LOADS", "LAST LOAD"):
        table.add_column(column)
    slots: list[dict[str, Any]] = (view.status or {}).get("slots", [])
    for slot in slots:
        idle = slot.get("idle_s") if slot.get("state") == "ready" else None
        table.add_row(
            str(slot.get("slot")),
            slot.get("gpus") or "-",
            escape(str(slot.get("model") or "-")),
            str(slot.get("state")),
            str(slot.get("in_flight")),
            _seconds(idle) if not slot.get("in_flight") else "busy",
            str(slot.get("loads")),
            _seconds(slot.get("last_load_s")),
        )
    return table


def _catalogue_line(view: PoolView) -> str:
    parts = []
    for entry in (view.status or {}).get("catalogue", []):
        where = f"slot {entry['slot']}" if entry.get("slot") is not None else "not loaded"
        if entry.get("loading"):
            where = "loading"
        parts.append(f"{entry.get('model')} ({where}, {entry.get('loads', 0)} loads)")
    return "catalogue: " + (", ".join(parts) or ", ".join(view.record.serves))


def _on_demand_table(views: list[OnDemandView], now: float) -> Table:
    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "JOB", "STATE", "SINCE", "IDLE", "TTL", "WHY"):
        table.add_column(column)
    for view in views:
        table.add_row(
            escape(view.model),
            view.job or "-",
            view.state,
            age(view.started_at, now) + " ago" if view.started_at else "-",
            _seconds(view.idle_s(now)),
            _seconds(view.idle_ttl_s),
            escape(view.why or "-"),
        )
    return table


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for each pool's answer.")
    ] = 5.0,
) -> None:
    """Each live swap pool's slots (model, state, idle time, loads) and on-demand jobs."""
    run_there(ctx)
    cli: CliContext = ctx.obj
    report = pool_report(cli.site(), timeout_s=timeout_s)
    if as_json:
        print_json(report.public())
        return
    if not report.pools and not report.on_demand:
        stderr().print("no swap pools and no jobs started on demand")
        return
    out = stdout()
    for view in report.pools:
        out.print(escape(_pool_title(view)), soft_wrap=True)
        out.print(_pool_table(view))
        if view.error:
            out.print(f"  [yellow]{escape(view.error)}[/]")
        out.print("  " + escape(_catalogue_line(view)))
        out.print()
    if report.on_demand:
        out.print("started on demand")
        out.print(_on_demand_table(report.on_demand, report.taken_at))


pool_app.command()(status)
