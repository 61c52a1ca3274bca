"""`mt tunnel <login-host>`, `mt tunnel status`, `mt tunnel close`: the laptop's way in.

`mt tunnel HOST` is `mt tunnel open HOST` (the group below reads an unknown first word as
the host), so the short form in the docs works and `status`/`close` stay subcommands.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from hpc.cli.output import age, print_json, stderr, stdout
from tunnels.base import TunnelSpec
from tunnels.engines import ENGINES, choose
from tunnels.state import TunnelRecord, TunnelStates, tunnels_dir
from tunnels.supervisor import HeldTunnel, close_tunnels, start_background


class _TunnelGroup(TyperGroup):
    """`mt tunnel HOST …` means `mt tunnel open HOST …`."""

    # Any: typer vendors click (typer._click), whose Context is not public API.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["open", *args]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """The group's only option is --help: `mt tunnel HOST [OPTIONS]`, not `[OPTIONS] HOST`."""
        return [self.subcommand_metavar or "COMMAND"]


app = typer.Typer(
    cls=_TunnelGroup,
    # The shorthand is the form the docs use, so the usage line and help name it. In help,
    # rich markup needs `\\[`; the usage line is plain text.
    subcommand_metavar="HOST [OPTIONS] | COMMAND [ARGS]...",
    help=(
        "Forward 127.0.0.1:PORT on this laptop to the gateway on a login node over SSH.\n\n"
        "`mt tunnel HOST \\[OPTIONS]` is `mt tunnel open HOST \\[OPTIONS]`: HOST is "
        "\\[user@]host\\[:port] or an ~/.ssh/config alias. Its options (--local-port, "
        "--background, -J, -i, -F, …) are listed by `mt tunnel open --help`."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _host(value: str) -> str:
    if not value or value.startswith("-") or any(c.isspace() or not c.isprintable() for c in value):
        raise typer.BadParameter("expected [user@]host[:port] or an ~/.ssh/config alias")
    return value


def ready_text(spec: TunnelSpec, engine: str) -> list[str]:
    """What the user pastes next."""
    return [
        f"tunnel up: {spec.url} → {spec.host} 127.0.0.1:{spec.remote_port} ({engine})",
        f'  curl {spec.url}/v1/models -H "Authorization: Bearer $MT_API_KEY"',
        f"  export OPENAI_BASE_URL={spec.url}/v1",
    ]


@app.command("open")
def open_tunnel(
    host: Annotated[
        str,
        typer.Argument(
            callback=_host, help="The login node: \\[user@]host[:port] or an ~/.ssh/config alias."
        ),
    ],
    local_port: Annotated[
        int, typer.Option("--local-port", min=1, max=65535, help="Port on 127.0.0.1 here.")
    ] = 8081,
    remote_port: Annotated[
        int,
        typer.Option(
            "--remote-port", min=1, max=65535, help="The gateway's port on the login node."
        ),
    ] = 8081,
    jump: Annotated[
        str | None, typer.Option("--jump", "-J", help="ProxyJump host(s), comma-separated.")
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", "-i", help="SSH private key (default: agent, config)."),
    ] = None,
    engine: Annotated[
        str,
        typer.Option("--engine", help=f"auto, {', '.join(ENGINES)} (auto: openssh if installed)."),
    ] = "auto",
    accept_new: Annotated[
        bool,
        typer.Option(
            "--accept-new", help="Add the host key if none is known (then pinned). Check it first."
        ),
    ] = False,
    known_hosts: Annotated[
        Path | None, typer.Option("--known-hosts", help="known_hosts file (default: ssh config's).")
    ] = None,
    ssh_config: Annotated[
        Path | None, typer.Option("--ssh-config", "-F", help="ssh config (default ~/.ssh/config).")
    ] = None,
    keepalive_s: Annotated[
        int, typer.Option("--keepalive", min=1, help="Seconds between keepalives (3 missed: down).")
    ] = 15,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Do not check /healthz through the tunnel.")
    ] = False,
    background: Annotated[
        bool, typer.Option("--background", help="Keep the tunnel open after this command returns.")
    ] = False,
    detached: Annotated[
        bool, typer.Option("--detached", hidden=True, help="Started by --background.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Open a tunnel and keep it up (Ctrl-C ends it) or, with --background, leave it running."""
    spec = TunnelSpec(
        host=host,
        local_port=local_port,
        remote_port=remote_port,
        jump=jump,
        identity=identity.expanduser() if identity else None,
        known_hosts=known_hosts.expanduser() if known_hosts else None,
        ssh_config=ssh_config.expanduser() if ssh_config else None,
        accept_new=accept_new,
        keepalive_s=keepalive_s,
    )
    chosen = choose(engine)
    states = TunnelStates(tunnels_dir())
    if background:
        argv = [sys.executable, "-m", "hpc.cli", "tunnel", "open", host]
        argv += ["--local-port", str(local_port), "--remote-port", str(remote_port)]
        argv += ["--engine", chosen, "--keepalive", str(keepalive_s)]
        for flag, value in (
            ("--jump", jump),
            ("--identity", spec.identity),
            ("--known-hosts", spec.known_hosts),
            ("--ssh-config", spec.ssh_config),
        ):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--accept-new"] * accept_new + ["--no-check"] * no_check + ["--detached"]
        record = start_background(argv, states, local_port)
        _render_up(spec, record.engine, record, as_json)
        return
    _run_foreground(spec, chosen, states, check=not no_check, detached=detached, as_json=as_json)


def _render_up(spec: TunnelSpec, engine: str, record: TunnelRecord, as_json: bool) -> None:
    if as_json:
        print_json(_row(record))
        return
    for line in ready_text(spec, engine):
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _row(record: TunnelRecord) -> dict[str, Any]:
    """A record as `--json` shows it (a background failure is reported as an error instead)."""
    return record.model_dump(mode="json", exclude={"failure"})


def _run_foreground(
    spec: TunnelSpec,
    engine_name: str,
    states: TunnelStates,
    *,
    check: bool,
    detached: bool,
    as_json: bool,
) -> None:
    err = stderr()
    stop = threading.Event()

    def news(line: str) -> None:
        err.print(f"{time.strftime('%H:%M:%S')} tunnel {line}")

    def ask_stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    held = HeldTunnel(spec, engine_name, states, news, detached=detached)
    record = held.open(check=check)
    try:
        _render_up(spec, engine_name, record, as_json)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, ask_stop)
        held.hold(stop)
    finally:
        held.close()


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """The tunnels open on this machine (foreground and background)."""
    records = TunnelStates(tunnels_dir()).records()
    rows = [_row(r) | {"state": r.state if r.alive() else "stale"} for r in records]
    if as_json:
        print_json(rows)
        return
    if not rows:
        stderr().print("no tunnels open (`mt tunnel HOST` opens one)")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("URL", "HOST", "REMOTE", "ENGINE", "STATE", "RECONNECTS", "PID", "AGE"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            str(row["url"]),
            str(row["host"]),
            str(row["remote_port"]),
            str(row["engine"]),
            str(row["state"]),
            str(row["reconnects"]),
            str(row["pid"]),
            age(float(row["started_at"])),
        )
    stdout().print(table)


@app.command()
def close(
    local_port: Annotated[
        int | None, typer.Argument(help="The tunnel's local port (default: the only one).")
    ] = None,
    close_all: Annotated[bool, typer.Option("--all", help="Close every tunnel.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """End tunnels by their process id and forget them."""
    closed = close_tunnels(TunnelStates(tunnels_dir()), local_port, every=close_all)
    if as_json:
        print_json({"closed": closed})
    elif closed:
        stderr().print("closed " + ", ".join(f"127.0.0.1:{p}" for p in closed))
    else:
        stderr().print("no tunnels open")
