"""The `mt` command line: parse, call the library, render. Errors: `error:` + `hint:`, exit 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from hpc import __version__
from hpc.cli import (
    benchcmd,
    doctorcmd,
    exportcmd,
    imagecmd,
    jobcmds,
    keycmds,
    poolcmd,
    remote,
    servecmds,
    tunnelcmd,
)
from hpc.cli.context import CliContext
from hpc.cli.output import print_error
from hpc.errors import MTError

app = typer.Typer(
    name="mt",
    help="ModelTainer: serve LLMs on Slurm, Kubernetes or this machine, behind one OpenAI URL.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # this CLI handles keys and tokens
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mt {__version__}")
        raise typer.Exit


def _ssh_host(value: str | None) -> str | None:
    # Never a shell word (paramiko takes it as a host name), but a space or control
    # character is a typo, not a host.
    if value is not None and (not value or any(c.isspace() or not c.isprintable() for c in value)):
        raise typer.BadParameter("expected [user@]host[:port] or an ~/.ssh/config alias")
    return value


@app.callback()
def _root(
    ctx: typer.Context,
    site: Annotated[
        Path | None, typer.Option("--site", help="site.yaml (default $MT_HOME/site.yaml).")
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(
            "--models",
            "-m",
            help="models.yaml (default $MT_MODELS, else ./models.yaml, else $MT_HOME/models.yaml).",
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            callback=_ssh_host,
            help="Act on this login node over SSH (submit, status, logs, cancel, models, pool "
            "status and doctor run as mt there, on its registry and Slurm): \\[user@]host[:port] "
            "or an ~/.ssh/config alias (default: slurm.ssh_host in site.yaml, else here).",
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="SSH private key for --host (default: agent, ssh config)."),
    ] = None,
    here: Annotated[
        bool,
        typer.Option(
            "--here",
            hidden=True,  # what `mt --host` runs on the login node: never a hop further
            help="Act on this machine, whatever slurm.ssh_host says.",
        ),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if here and host is not None:
        raise typer.BadParameter("--here and --host contradict each other", param_hint="--here")
    if here:
        remote.stop_when_the_channel_closes()
    cli = CliContext(site_file=site, models_file=models, host=host, identity=identity, here=here)
    ctx.obj = cli
    ctx.call_on_close(cli.close)  # one SSH connection per command, closed when it ends


app.command()(jobcmds.submit)
app.command()(jobcmds.status)
app.command()(jobcmds.logs)
app.command()(jobcmds.cancel)
app.command()(jobcmds.render)
app.command()(servecmds.models)
app.command()(servecmds.gateway)
app.command()(doctorcmd.doctor)
app.command()(benchcmd.bench)
app.command()(exportcmd.export)
app.add_typer(keycmds.keys_app, name="keys")
app.add_typer(tunnelcmd.app, name="tunnel")
app.add_typer(imagecmd.image_app, name="image")
app.add_typer(poolcmd.pool_app, name="pool")


def main(argv: list[str] | None = None) -> int:
    """Run `mt`; returns the exit code (1 for errors, 2 for usage, 130 for Ctrl-C)."""
    command = typer.main.get_command(app)
    try:
        # Standalone mode: typer prints usage errors itself and exits 2.
        command.main(args=argv, prog_name="mt", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MTError as exc:
        print_error(exc)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
