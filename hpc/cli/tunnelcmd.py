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
from hpc.errors import MTError
from tunnels.access import Access
from tunnels.base import TunnelSpec
from tunnels.engines import ENGINES, choose
from tunnels.state import TunnelRecord, TunnelStates, tunnels_dir
from tunnels.supervisor import (
    HeldTunnel,
    background_access,
    background_env_file,
    close_tunnels,
    start_background,
)


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


def ready_text(spec: TunnelSpec, engine: str, env_file: Path | None) -> list[str]:
    """What stderr says once the tunnel is up (stdout has the env lines)."""
    lines = [f"tunnel up: {spec.url} → {spec.host} 127.0.0.1:{spec.remote_port} ({engine})"]
    if env_file is not None:
        lines.append(f"  OPENAI_BASE_URL and OPENAI_API_KEY are in {env_file} (0600)")
        lines.append(f"  use them: set -a; . {env_file}; set +a")
    else:
        lines.append(
            "  use them: export the lines below, or `--env-file PATH` and `set -a; . PATH`"
        )
    return lines


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
    owner_key: Annotated[
        str | None,
        typer.Option(
            "--owner-key",
            help="The gateway owner's key file on the login node (default: "
            "$MT_HOME/gateway/owner.key there).",
        ),
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option(
            "--env-file",
            help="Write OPENAI_BASE_URL and OPENAI_API_KEY to this file (0600) instead of "
            "printing the key.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Open a tunnel and keep it up (Ctrl-C ends it) or, with --background, leave it running.

    Prints OPENAI_API_KEY=… (your gateway key, read over the SSH connection) and
    OPENAI_BASE_URL=… lines on stdout; the rest goes to stderr.
    """
    env_file = env_file.expanduser().absolute() if env_file else None
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
        owner_key=owner_key,
    )
    chosen = choose(engine)
    states = TunnelStates(tunnels_dir())
    if background:
        argv = [sys.executable, "-m", "hpc.cli", "tunnel", "open", host]
        argv += ["--local-port", str(local_port), "--remote-port", str(remote_port)]
        argv += ["--engine", chosen, "--keepalive", str(keepalive_s)]
        # The detached tunnel hands the key over in a 0600 file, never in an argv.
        handover = env_file or background_env_file(states, local_port)
        for flag, value in (
            ("--jump", jump),
            ("--identity", spec.identity),
            ("--known-hosts", spec.known_hosts),
            ("--ssh-config", spec.ssh_config),
            ("--owner-key", owner_key),
            ("--env-file", handover),
        ):
            if value is not None:
                argv += [flag, str(value)]
        argv += ["--accept-new"] * accept_new + ["--no-check"] * no_check + ["--detached"]
        record = start_background(argv, states, local_port)
        access = background_access(handover, keep=env_file is not None)
        problem = None
        if record.notice is not None:
            problem = MTError(record.notice.message, hint=record.notice.hint)
        _render_up(spec, record, access, problem, env_file=env_file, as_json=as_json)
        return
    _run_foreground(
        spec,
        chosen,
        states,
        check=not no_check,
        detached=detached,
        env_file=env_file,
        as_json=as_json,
    )


def _render_up(
    spec: TunnelSpec,
    record: TunnelRecord,
    access: Access,
    problem: MTError | None,
    *,
    env_file: Path | None,
    as_json: bool,
) -> None:
    """The env lines on stdout (the key only without ``env_file``), the news on stderr."""
    with_key = env_file is None
    if as_json:
        extra: dict[str, Any] = {"env": access.env(with_key=with_key)}
        if env_file is not None:
            extra["env_file"] = str(env_file)
        if problem is not None:
            extra["owner_key_error"] = {"message": problem.message, "hint": problem.hint}
        print_json(_row(record) | extra)
        return
    err = stderr()
    for line in ready_text(spec, record.engine, env_file if access.key else None):
        err.print(line, soft_wrap=True, markup=False, highlight=False)
    if problem is not None:
        err.print(f"warning: {problem.message}", soft_wrap=True, markup=False, highlight=False)
        if problem.hint:
            err.print(f"hint: {problem.hint}", soft_wrap=True, markup=False, highlight=False)
    sys.stdout.write("".join(line + "\n" for line in access.env_lines(with_key=with_key)))
    sys.stdout.flush()


def _row(record: TunnelRecord) -> dict[str, Any]:
    """A record as `--json` shows it (a background failure is reported as an error instead)."""
    return record.model_dump(mode="json", exclude={"failure", "notice"})


def _run_foreground(
    spec: TunnelSpec,
    engine_name: str,
    states: TunnelStates,
    *,
    check: bool,
    detached: bool,
    env_file: Path | None,
    as_json: bool,
) -> None:
    err = stderr()
    stop = threading.Event()

    def news(line: str) -> None:
        err.print(f"{time.strftime('%H:%M:%S')} tunnel {line}")

    def ask_stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    held = HeldTunnel(spec, engine_name, states, news, detached=detached)
    record = held.open(check=check, env_file=env_file)
    try:
        _render_up(spec, record, held.access, held.key_problem, env_file=env_file, as_json=as_json)
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
