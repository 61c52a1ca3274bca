"""`mt --host LOGIN VERB …`: the verb runs as mt on the login node, over the one SSH connection.

The login node's registry, logs and scheduler are only whole there: its registry is a
directory on its filesystem, written under locks that only hold there, and its records are
reconciled against its own Slurm. So a verb that reads or changes them (submit, status, logs,
cancel, models, pool status, doctor) is not half-done here over SSH: the same verb, with the
same options, runs as ``<slurm.python> -m hpc.cli --here`` there (with ``slurm.ssh_env``
before it), and its output and exit code come back as they are written. This machine's
registry is neither read nor written. For `mt submit`, this machine's models.yaml (if it
has one) goes along on standard input, so the model named here is the one submitted there.
Ctrl-C here closes the channel; the mt there notices at once
(:func:`stop_when_the_channel_closes`) and stops as Ctrl-C would stop it.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import threading
from typing import BinaryIO

import typer
from typer.core import TyperArgument, TyperOption

from hpc.cli.context import STDIN_MODELS, CliContext
from hpc.errors import MTError


def verb_argv(ctx: typer.Context) -> list[str]:
    """The verb and the options the user gave it, as argv again (defaults are left out, so
    the login node's own defaults apply); arguments after ``--``."""
    words = ctx.command_path.split()[1:]  # "mt pool status" → pool status
    options: list[str] = []
    arguments: list[str] = []
    for param in ctx.command.params:
        name = param.name
        source = ctx.get_parameter_source(name) if name is not None else None
        if name is None or source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[name]
        if isinstance(param, TyperArgument):
            values = value if isinstance(value, list | tuple) else [value]
            arguments += [str(v) for v in values]
        elif isinstance(param, TyperOption):
            if param.is_flag:
                flags = param.opts if value else param.secondary_opts
                if flags:
                    options.append(flags[0])
                continue
            values = value if param.multiple else [value]
            for one in values:
                options += [param.opts[0], str(one)]
    return [*words, *options, "--", *arguments] if arguments else [*words, *options]


def run_there(ctx: typer.Context, *, send_models: bool = False) -> None:
    """If this command goes to a login node (`mt --host`, or site.yaml's ``slurm.ssh_host``),
    run it there and exit with its exit code; else return, and the command runs here.

    ``send_models``: send this machine's models.yaml (if there is one) on standard input.
    """
    cli: CliContext = ctx.obj
    transport = cli.login_node()
    if transport is None:
        return
    python = cli.site(check_permissions=False).config.slurm.python
    where = transport.target
    if not python:
        raise MTError(
            f"slurm.python is not set, so mt cannot run on {where}",
            hint="set slurm.python in site.yaml to the Python with ModelTainer on the cluster "
            "(the login node runs mt with it, and the jobs too)",
        )
    root: list[str] = []
    stdin: bytes | None = None
    if send_models and cli.models_path().is_file():
        cli.models()  # a bad models.yaml is reported here, naming this machine's file
        stdin = cli.models_path().read_bytes()
        root = ["--models", STDIN_MODELS]
    argv = [python, "-m", "hpc.cli", "--here", *root, *verb_argv(ctx)]
    if sys.stdout.isatty():  # tables there as wide as this terminal
        argv = ["env", f"COLUMNS={shutil.get_terminal_size().columns}", *argv]
    err = _Tail(sys.stderr.buffer)
    try:
        code = transport.relay(argv, stdin=stdin, out=sys.stdout.buffer, err=err)
    except FileNotFoundError as exc:
        raise MTError(
            f"{python} (slurm.python) is not on {where}",
            hint="set slurm.python in site.yaml to the Python with ModelTainer on the cluster, "
            f"as the login node sees it (`ssh {where.alias} {python} -m hpc.cli --version` "
            "should print mt's version)",
        ) from exc
    # Python's words for `-m hpc.cli` without ModelTainer, with and without quotes.
    if code != 0 and any(said in err.tail for said in (b"named 'hpc", b"named hpc")):
        raise MTError(
            f"ModelTainer is not installed for {python} (slurm.python) on {where}",
            hint=f"install it there (`{python} -m pip install modeltainer`), or set "
            "slurm.python in site.yaml to the Python that has it",
        )
    raise typer.Exit(code)


class _Tail:
    """A stream that writes through and keeps its last bytes (what went wrong there)."""

    def __init__(self, stream: BinaryIO, keep: int = 4096) -> None:
        self.stream = stream
        self.keep = keep
        self.tail = b""

    def write(self, data: bytes) -> int:
        self.tail = (self.tail + data)[-self.keep :]
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def stop_when_the_channel_closes() -> None:
    """In the mt that `mt --host` runs on the login node (``--here``): when the laptop's
    end goes away (Ctrl-C there, a dropped connection), stop as if Ctrl-C was pressed here.

    sshd closes its end of the command's standard output when the channel closes; poll
    reports that as POLLERR (a pipe) or POLLHUP (a socket) on our end at once, whereas a
    `logs -f` or `--wait` that writes nothing for minutes would not learn it from a failed
    write until then. A terminal or a file never reports either: nothing happens.
    """
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return  # no real stdout (captured in-process): nothing to watch

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, 0)  # no events asked: POLLERR and POLLHUP always come
        for _fd, events in poller.poll():
            if events & (select.POLLERR | select.POLLHUP):
                os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="mt-channel-watch", daemon=True).start()
