"""`mt models`, `mt gateway`: what is served, and the gateway that serves it (`mt keys`:
hpc.cli.keycmds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hpc.catalog import Catalog, ServedModel, catalog, listing
from hpc.cli.context import CliContext
from hpc.cli.output import print_json, stderr, stdout
from hpc.cli.remote import run_there
from hpc.errors import ConfigError
from hpc.ondemandstate import default_path, read_ondemand_state
from hpc.registry import Registry
from hpc.spec import ModelsFile

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


# What the READY ENDPOINTS column says of a name without one, by its state.
_NO_ENDPOINT = {"on_demand": "starts on request", "starting": "starting"}


def _catalog(cli: CliContext) -> Catalog:
    """What the gateway would serve now; without a models.yaml, the ready jobs alone."""
    try:
        configured: ModelsFile | None = cli.models()
    except ConfigError:
        if cli.models_path().exists():
            raise
        configured = None
    return catalog(configured, Registry(cli.site().registry_dir).records())


def served(cli: CliContext) -> list[ServedModel]:
    """What the gateway would serve now (:func:`hpc.catalog.catalog`'s rows)."""
    return list(_catalog(cli).models)


def models(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """What the gateway would serve: configured models, static backends, ready jobs, aliases,
    and whether each answers now, starts on request, or is stopped."""
    run_there(ctx)
    cli: CliContext = ctx.obj
    # The gateway's on-demand state file says how long each model's last start took.
    starts = read_ondemand_state(default_path(cli.site().registry_dir))
    last_starts = {
        name: entry.last_start_s for name, entry in starts.items() if entry.last_start_s is not None
    }
    rows: dict[str, dict[str, object]] = {
        row.model.name: {
            "name": row.model.name,
            "source": row.model.source,
            "engine": row.model.engine,
            "endpoints": [endpoint.base_url for endpoint in row.model.endpoints],
            "alias_of": row.model.alias_of,
            **row.extension(),
        }
        for row in listing(_catalog(cli), last_starts)
    }
    if as_json:
        print_json(list(rows.values()))
        return
    if not rows:
        stderr().print(
            f"no models: add some to {cli.models_path()} (see docs/examples/models.yaml)"
        )
        return
    table = Table(box=None, pad_edge=False)
    for column in ("MODEL", "SOURCE", "ENGINE", "STATE", "READY ENDPOINTS"):
        table.add_column(column)
    for row in rows.values():
        endpoints = row["endpoints"]
        if not isinstance(endpoints, list):
            endpoints = []
        state = str(row["state"])
        waiting = _NO_ENDPOINT.get(state, "mt submit it")
        if row["last_start_s"] is not None:
            state += f" (last start {row['last_start_s']:.0f} s)"
        table.add_row(
            str(row["name"]),
            f"alias of {row['alias_of']}" if row["alias_of"] else str(row["source"]),
            str(row["engine"]),
            state,
            ", ".join(endpoints) or f"[dim]none ({waiting})[/]",
        )
    stdout().print(table)


def _gateway_option(field: str, flag: str) -> Any:
    """A typer option for ``GatewayConfig.<field>``: its help and bounds come from the model.

    The model is the one source of the gateway's defaults, bounds and help: the option
    checks a value with the field's own validator, so a bad one is a usage error (exit 2).
    """
    from pydantic import TypeAdapter, ValidationError

    from gateway.config import GatewayConfig

    info = GatewayConfig.model_fields[field]
    # The field's own FieldInfo as Annotated metadata: its type with its constraints.
    annotated: Any = Annotated
    adapter: TypeAdapter[Any] = TypeAdapter(annotated[info.annotation, info])
    bounds = [
        f"{sign} {getattr(rule, attr)}"
        for rule in info.metadata
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if hasattr(rule, attr)
    ]
    if field.endswith("_s"):
        bounds.insert(0, "seconds")
    description = info.description or ""
    text = description[:1].upper() + description[1:] + (f" ({', '.join(bounds)}).")

    def check(value: Any) -> Any:
        if value is None:
            return None
        try:
            return adapter.validate_python(value)
        except ValidationError as exc:
            raise typer.BadParameter(exc.errors()[0]["msg"]) from None

    return typer.Option(flag, help=text, callback=check)


def _gateway_default(field: str) -> Any:
    """The default of ``GatewayConfig.<field>``, for the option that sets it."""
    from gateway.config import GatewayConfig

    return GatewayConfig.model_fields[field].default


def gateway(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[
        int | None, typer.Option(help="Port (default 8081; 0 picks a free one).")
    ] = None,
    keys: Annotated[
        Path | None,
        typer.Option(
            "--keys",
            help="keys.yaml: also accept these API keys (mt keys create); your own key "
            "($MT_HOME/gateway/owner.key, `mt keys owner`) is always accepted.",
        ),
    ] = None,
    connect_timeout: Annotated[
        float, _gateway_option("connect_timeout_s", "--connect-timeout")
    ] = _gateway_default("connect_timeout_s"),
    first_token_timeout: Annotated[
        float, _gateway_option("first_token_timeout_s", "--first-token-timeout")
    ] = _gateway_default("first_token_timeout_s"),
    unhealthy_first_token_timeout: Annotated[
        float,
        _gateway_option("unhealthy_first_token_timeout_s", "--unhealthy-first-token-timeout"),
    ] = _gateway_default("unhealthy_first_token_timeout_s"),
    idle_timeout: Annotated[
        float, _gateway_option("idle_timeout_s", "--idle-timeout")
    ] = _gateway_default("idle_timeout_s"),
    max_in_flight: Annotated[
        int | None, _gateway_option("max_in_flight", "--max-in-flight")
    ] = _gateway_default("max_in_flight"),
    max_in_flight_per_model: Annotated[
        int | None, _gateway_option("max_in_flight_per_model", "--max-in-flight-per-model")
    ] = _gateway_default("max_in_flight_per_model"),
    retry_after: Annotated[
        int, _gateway_option("retry_after_s", "--retry-after")
    ] = _gateway_default("retry_after_s"),
    backend: Annotated[
        str | None,
        typer.Option(
            "--backend", help="Where on-demand models' jobs go (default: site's default_backend)."
        ),
    ] = None,
    max_on_demand_jobs: Annotated[
        int | None, _gateway_option("max_on_demand_jobs", "--max-on-demand-jobs")
    ] = _gateway_default("max_on_demand_jobs"),
    max_connections: Annotated[
        int | None, _gateway_option("max_connections", "--max-connections")
    ] = _gateway_default("max_connections"),
    max_connections_per_client: Annotated[
        int | None,
        _gateway_option("max_connections_per_client", "--max-connections-per-client"),
    ] = _gateway_default("max_connections_per_client"),
    header_timeout: Annotated[
        float, _gateway_option("header_timeout_s", "--header-timeout")
    ] = _gateway_default("header_timeout_s"),
    body_timeout: Annotated[
        float, _gateway_option("body_timeout_s", "--body-timeout")
    ] = _gateway_default("body_timeout_s"),
    max_body_mb: Annotated[
        float, _gateway_option("max_body_mb", "--max-body-mb")
    ] = _gateway_default("max_body_mb"),
    shutdown_grace: Annotated[
        float, _gateway_option("shutdown_grace_s", "--shutdown-grace")
    ] = _gateway_default("shutdown_grace_s"),
    health_interval: Annotated[
        float, _gateway_option("health_interval_s", "--health-interval")
    ] = _gateway_default("health_interval_s"),
    health_timeout: Annotated[
        float, _gateway_option("health_timeout_s", "--health-timeout")
    ] = _gateway_default("health_timeout_s"),
    health_failures: Annotated[
        int, _gateway_option("health_failures_to_eject", "--health-failures")
    ] = _gateway_default("health_failures_to_eject"),
    redis_url_file: Annotated[
        Path | None,
        typer.Option(
            "--redis-url-file",
            help="A file only you can read with the Redis URL (redis://:PASSWORD@HOST:6379/0) "
            "through which gateway replicas share limits; else $MT_REDIS_URL.",
        ),
    ] = None,
    redis_prefix: Annotated[
        str, _gateway_option("redis_prefix", "--redis-prefix")
    ] = _gateway_default("redis_prefix"),
    discover: Annotated[str | None, _gateway_option("discover", "--discover")] = _gateway_default(
        "discover"
    ),
    discover_interval: Annotated[
        float, _gateway_option("discover_interval_s", "--discover-interval")
    ] = _gateway_default("discover_interval_s"),
) -> None:
    """Run the OpenAI-compatible gateway in the foreground; it requires a key (yours:
    `mt keys owner`)."""
    from gateway.config import GatewayConfig
    from gateway.redisurl import REDIS_URL_ENV, read_url
    from gateway.server import run
    from hpc.jobs import service
    from hpc.ownerkey import ensure_owner_key

    cli: CliContext = ctx.obj
    site = cli.site()
    # Built now (no I/O) so that a bad name fails before the gateway listens.
    on_demand_backend = service(site, backend)
    models_file = cli.models_path()
    # The default lives here, not in GatewayConfig: an app built in-process has no owner.
    owner_key, created = ensure_owner_key(site.home)
    stderr().print(
        f"{'created' if created else 'using'} the owner key {owner_key} (only you can read "
        "it): `mt keys owner --env` prints OPENAI_API_KEY, `mt tunnel` reads it for a laptop",
        soft_wrap=True,
    )
    if redis_url_file is not None:
        cli.check_private(redis_url_file)  # the URL may carry a password
    redis_url = (
        read_url(redis_url_file) if redis_url_file else os.environ.get(REDIS_URL_ENV) or None
    )
    config = GatewayConfig(
        host=host or site.config.gateway.host,
        port=site.config.gateway.port if port is None else port,
        registry_dir=site.registry_dir,
        models_file=models_file if models_file.exists() else None,
        keys_file=keys,
        owner_key_file=owner_key,
        connect_timeout_s=connect_timeout,
        first_token_timeout_s=first_token_timeout,
        unhealthy_first_token_timeout_s=unhealthy_first_token_timeout,
        idle_timeout_s=idle_timeout,
        max_in_flight=max_in_flight,
        max_in_flight_per_model=max_in_flight_per_model,
        shutdown_grace_s=shutdown_grace,
        header_timeout_s=header_timeout,
        body_timeout_s=body_timeout,
        max_body_mb=max_body_mb,
        retry_after_s=retry_after,
        health_interval_s=health_interval,
        health_timeout_s=health_timeout,
        health_failures_to_eject=health_failures,
        max_on_demand_jobs=max_on_demand_jobs,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        redis_url=redis_url,
        redis_prefix=redis_prefix,
        discover=discover,
        discover_interval_s=discover_interval,
    )
    # The site's check covered MT_HOME, the registry and the default files; these are the
    # gateway's own (a --keys elsewhere).
    cli.check_private(*(path for path in (config.keys_file, config.state_file()) if path))
    run(config, backend=on_demand_backend)
