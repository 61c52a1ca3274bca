"""`mt keys`: the gateway's API keys (stored hashed in keys.yaml) and the owner's key."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from hpc.cli.context import CliContext
from hpc.cli.output import print_json, stderr, stdout

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


keys_app = typer.Typer(
    help="API keys for the gateway (stored hashed in keys.yaml).", no_args_is_help=True
)


KeysOpt = Annotated[
    Path | None, typer.Option("--keys", help="keys.yaml (default $MT_HOME/keys.yaml).")
]


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Who the key is for (e.g. alice).")],
    keys: KeysOpt = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help="Allow only models matching this glob (repeatable)."),
    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    expires: Annotated[
        datetime | None,
        typer.Option("--expires", help="Expiry (ISO 8601, UTC unless a zone is given)."),
    ] = None,
    max_on_demand_jobs: Annotated[
        int | None,
        typer.Option(
            "--max-on-demand-jobs", help="Live on-demand jobs this key's requests may start."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    from gateway.keys import create_key

    cli: CliContext = ctx.obj
    path = keys or cli.default_keys_file()
    cli.check_private(path)
    key = create_key(
        path,
        name,
        models=tuple(models) if models else None,
        requests_per_min=rpm,
        tokens_per_min=tpm,
        expires_at=expires,
        max_on_demand_jobs=max_on_demand_jobs,
    )
    if as_json:
        print_json({"name": name, "key": key, "keys_file": str(path)})
        return
    stdout().print(key, soft_wrap=True)
    stderr().print(
        f"created key {name!r} in {path}; it is shown only this once. "
        f"Start the gateway with: mt gateway --keys {path}"
    )


@keys_app.command("list")
def keys_list(ctx: typer.Context, keys: KeysOpt = None, as_json: JsonOpt = False) -> None:
    """List keys: names, allowed models, limits, expiry (never a key, nor its hash)."""
    from gateway.keys import list_keys

    cli: CliContext = ctx.obj
    path = keys or cli.default_keys_file()
    cli.check_private(path)
    entries = list_keys(path)
    if as_json:
        print_json([entry.model_dump(mode="json", exclude={"sha256"}) for entry in entries])
        return
    if not entries:
        stderr().print(f"no keys in {path} (mt keys create NAME)")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "MODELS", "REQ/MIN", "TOKENS/MIN", "EXPIRES"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry.name,
            ", ".join(entry.models) if entry.models is not None else "*",
            str(entry.requests_per_min or "-"),
            str(entry.tokens_per_min or "-"),
            entry.expires_at.isoformat() if entry.expires_at else "never",
        )
    stdout().print(table)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The key's name.")],
    keys: KeysOpt = None,
) -> None:
    """Remove a key; a running gateway stops accepting it on its next reload (about 1 s)."""
    from gateway.keys import revoke_key

    cli: CliContext = ctx.obj
    path = keys or cli.default_keys_file()
    cli.check_private(path)
    revoke_key(path, name)
    stderr().print(f"revoked key {name!r} in {path}")


@keys_app.command("owner")
def keys_owner(
    ctx: typer.Context,
    env: Annotated[
        bool,
        typer.Option(
            "--env", help="Print OPENAI_BASE_URL=… and OPENAI_API_KEY=… lines (site's port)."
        ),
    ] = False,
    rotate: Annotated[
        bool,
        typer.Option("--rotate", help="Replace it; a running gateway drops the old one in ~1 s."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print your own gateway key ($MT_HOME/gateway/owner.key; created if absent)."""
    from hpc.ownerkey import ensure_owner_key, read_owner_key, rotate_owner_key

    cli: CliContext = ctx.obj
    site = cli.site()
    path = rotate_owner_key(site.home) if rotate else ensure_owner_key(site.home)[0]
    key = read_owner_key(path)
    base_url = site.config.gateway.url(wildcard_as="127.0.0.1")  # a client on this machine
    if as_json:
        print_json({"key": key, "key_file": str(path), "base_url": base_url})
    elif env:
        sys.stdout.write(f"OPENAI_BASE_URL={base_url}\nOPENAI_API_KEY={key}\n")
    else:
        sys.stdout.write(key + "\n")
