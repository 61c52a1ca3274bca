"""`mt models`, `mt gateway`, `mt keys`: what is served and who may use it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hpc.cli.context import CliContext
from hpc.cli.output import print_json, stderr, stdout
from hpc.errors import ConfigError
from hpc.registry import Registry

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """What the gateway would serve: configured models, static backends, ready jobs."""
    cli: CliContext = ctx.obj
    try:
        configured = cli.models()
    except ConfigError:
        if cli.models_path().exists():
            raise
        configured = None
    ready: dict[str, list[str]] = {}
    for record in Registry(cli.site().registry_dir).records():
        if record.state == "ready" and record.base_url:
            ready.setdefault(record.model, []).append(record.base_url)
    rows: dict[str, dict[str, object]] = {}
    if configured is not None:
        for spec in configured.models:
            rows[spec.name] = {
                "name": spec.name,
                "source": "models.yaml",
                "engine": spec.engine,
                "endpoints": [],
            }
        for static in configured.static:
            rows[static.name] = {
                "name": static.name,
                "source": "static",
                "engine": "-",
                "endpoints": [static.base_url],
            }
    for name, urls in ready.items():
        row = rows.setdefault(name, {"name": name, "source": "job", "engine": "-", "endpoints": []})
        row["endpoints"] = [*row["endpoints"], *urls]  # type: ignore[misc]
    if as_json:
        print_json(list(rows.values()))
        return
    if not rows:
        stderr().print(
            f"no models: add some to {cli.models_path()} (see docs/examples/models.yaml)"
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "SOURCE", "ENGINE", "READY ENDPOINTS"):
        table.add_column(column)
    for row in rows.values():
        endpoints = row["endpoints"]
        if not isinstance(endpoints, list):
            endpoints = []
        table.add_row(
            str(row["name"]),
            str(row["source"]),
            str(row["engine"]),
            ", ".join(endpoints) or "[dim]none (mt submit it)[/]",
        )
    stdout().print(table)


def gateway(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default 8081; 0 picks a free one).")
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option("--keys", help="keys.yaml: require these API keys (mt keys create)."),
    ] = None,
) -> None:
    """Run the OpenAI-compatible gateway in the foreground."""
    from gateway.config import GatewayConfig
    from gateway.server import run

    cli: CliContext = ctx.obj
    site = cli.site()
    models_file = cli.models_path()
    config = GatewayConfig(
        host=host or site.config.gateway.host,
        port=site.config.gateway.port if port is None else port,
        registry_dir=site.registry_dir,
        models_file=models_file if models_file.exists() else None,
        keys_file=keys,
    )
    run(config)


keys_app = typer.Typer(
    help="API keys for the gateway (stored hashed in keys.yaml).", no_args_is_help=True
)


def default_keys_file(cli: CliContext) -> Path:
    """``$MT_HOME/keys.yaml``."""
    return cli.site().home / "keys.yaml"


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who the key is for (e.g. alice).")],
    keys: Annotated[
        Path | None, typer.Option("--keys", help="keys.yaml (default $MT_HOME/keys.yaml).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    from gateway.keys import create_key

    cli: CliContext = ctx.obj
    path = keys or default_keys_file(cli)
    key = create_key(path, name)
    if as_json:
        print_json({"name": name, "key": key, "keys_file": str(path)})
        return
    stdout().print(key, soft_wrap=True)
    stderr().print(
        f"created key {name!r} in {path}; it is shown only this once. "
        f"Start the gateway with: mt gateway --keys {path}"
    )
