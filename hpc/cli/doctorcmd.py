"""`mt doctor`: check this machine and, with a probe job, a compute node."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hpc.cli.context import CliContext
from hpc.cli.output import print_json, stderr, stdout
from hpc.cli.remote import run_there
from hpc.doctor import diagnosis as lib

_MARKS = {
    True: "[green]✓[/]",
    False: "[red]✗[/]",
    None: "[dim]\u2013[/]",
}  # en dash: not applicable


def doctor(
    ctx: typer.Context,
    probe: Annotated[
        bool,
        typer.Option("--probe/--no-probe", help="Run a small probe job on a compute node."),
    ] = True,
    gpus: Annotated[
        int, typer.Option("--gpus", min=0, help="GPUs the probe asks for (gres gpu:N).")
    ] = 0,
    partition: Annotated[
        str | None, typer.Option("--partition", help="Partition (default: the site's).")
    ] = None,
    timeout_s: Annotated[
        float,
        typer.Option("--timeout", min=1, help="Seconds to wait for the probe before cancelling."),
    ] = 120.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check Slurm, Apptainer, the registry and the jobs' Python; probe a compute node.

    Exits 1 if a check failed; a dash marks what does not apply here.
    """
    run_there(ctx)
    cli: CliContext = ctx.obj
    site = cli.site(check_permissions=False)  # it reports loose files rather than refuse
    if probe and not as_json:
        where = f"partition {partition}" if partition else "the default partition"
        stderr().print(
            f"probing a compute node on {where} with {gpus} GPU(s); "
            f"waiting up to {timeout_s:g}s (--no-probe skips it)"
        )
    diagnosis = lib.diagnose(site, probe=probe, gpus=gpus, partition=partition, timeout_s=timeout_s)
    if as_json:
        print_json(diagnosis.to_dict())
    else:
        _render(diagnosis)
    if not diagnosis.ok:
        raise typer.Exit(code=1)


def _render(diagnosis: lib.Diagnosis) -> None:
    table = Table(box=None, pad_edge=False, show_header=False)
    table.add_column("", no_wrap=True)
    table.add_column("CHECK", no_wrap=True, style="bold")
    table.add_column("RESULT")
    for check in diagnosis.checks:
        table.add_row(_MARKS[check.ok], escape(check.name), escape(check.detail))
        if check.hint and check.ok is not True:
            table.add_row("", "", f"[dim]hint: {escape(check.hint)}[/]")
    out = stdout()
    out.print(table)
    failed = sum(check.ok is False for check in diagnosis.checks)
    passed = sum(check.ok is True for check in diagnosis.checks)
    skipped = len(diagnosis.checks) - failed - passed
    probe = diagnosis.probe
    if probe is not None and probe.log_path:
        out.print(f"[dim]probe job log: {escape(probe.log_path)}[/]")
    summary = f"{passed} passed, {failed} failed, {skipped} not applicable"
    out.print(f"[red]{summary}[/]" if failed else f"[green]{summary}[/]")
