"""What the gateway serves, by name: configured models, aliases, static backends, ready jobs.

:func:`catalog` is the one place that decides which names exist and which endpoints serve
each: the gateway's route table, `mt models` and `mt export` all read it, so they never
disagree about which names exist. :func:`listing` says of each name whether a request to it
is answered now, after a start, or not: ``GET /v1/models`` and `mt models` both show it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hpc.registry import FINAL_STATES, Record
from hpc.spec import ModelsFile, ModelSpec, StaticBackend
from hpc.specserving import TokenLimits

Source = Literal["models.yaml", "static", "job", "alias"]
# ready: a job or static backend answers now; pool: a ready swap pool loads it on request;
# starting: a job of it is on its way; on_demand: the gateway starts a job on request;
# stopped: nothing serves it (configured only).
Availability = Literal["ready", "pool", "starting", "on_demand", "stopped"]


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI root (``…/v1``) serving a name, and where its key lives (never the key)."""

    base_url: str
    job: str | None = None  # the registry record key of the job whose engine this is
    api_key_env: str | None = None  # a static backend's key: this environment variable
    # The job's record, for the gateway (its key, engine, health path); kept out of repr.
    record: Record | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ServedModel:
    """A name the gateway routes, where it was declared, and its endpoints ready now.

    An alias (``source == "alias"``) names the model it stands for in ``alias_of`` and
    shares that model's engine and endpoints.
    """

    name: str
    source: Source
    engine: str
    endpoints: tuple[Endpoint, ...] = ()
    alias_of: str | None = None


@dataclass(frozen=True)
class Catalog:
    """Every served name, plus what the gateway needs to route and to refuse well.

    ``models`` lists each model (configured, static, job-only) and then each alias;
    ``starting`` names models a live job will serve once ready (a request gets 503, not
    404); ``pools`` maps a catalogue name to the first swap pool that serves it;
    ``fallbacks`` maps a model to the names to serve instead, in order; ``limits`` maps a
    model to its max_tokens default and cap (only models that set one); ``on_demand`` names
    the models the gateway starts on request.
    """

    models: tuple[ServedModel, ...]
    configured: tuple[str, ...] = ()
    starting: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pools: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, TokenLimits] = field(default_factory=dict)
    on_demand: frozenset[str] = frozenset()

    def routable(self) -> dict[str, tuple[Endpoint, ...]]:
        """Each model (not alias) with at least one endpoint, and its endpoints."""
        return {m.name: m.endpoints for m in self.models if m.alias_of is None and m.endpoints}


def catalog(configured: ModelsFile | None, records: Iterable[Record]) -> Catalog:
    """The catalog of ``models.yaml`` (if any) and the registry's records.

    Rows come in this order: configured models, static backends (a static entry replaces a
    model of the same name), names only running jobs serve, then aliases. A name's endpoints
    are its ready jobs in record order (a ready swap pool is an endpoint of every name in
    its ``serves``), then its static backend. Records that are neither ready nor final make
    their names ``starting``.
    """
    rows: dict[str, ServedModel] = {}
    job_endpoints: dict[str, list[Endpoint]] = {}
    starting: set[str] = set()
    aliases: dict[str, str] = {}
    fallbacks: dict[str, tuple[str, ...]] = {}
    pools: dict[str, str] = {}
    limits: dict[str, TokenLimits] = {}
    names: tuple[str, ...] = ()
    on_demand: frozenset[str] = frozenset()
    statics: dict[str, Endpoint] = {}
    if configured is not None:
        names = tuple(spec.name for spec in configured.models)
        on_demand = frozenset(spec.name for spec in configured.models if spec.on_demand)
        for spec in configured.models:
            rows[spec.name] = ServedModel(spec.name, "models.yaml", spec.engine)
        for static in configured.static:
            statics[static.name] = Endpoint(static.base_url, api_key_env=static.api_key_env)
            rows[static.name] = ServedModel(static.name, "static", "-")
        for pool in configured.pools:
            for name in pool.models:
                pools.setdefault(name, pool.name)
        entries: list[ModelSpec | StaticBackend] = [*configured.models, *configured.static]
        for entry in entries:
            aliases.update((alias, entry.name) for alias in entry.aliases)
            if entry.fallbacks:
                fallbacks[entry.name] = entry.fallbacks
            if entry.limits.any():
                limits[entry.name] = entry.limits
    for record in records:
        served = record.serves or (record.model,)  # a swap pool serves its catalogue
        if record.state == "ready" and record.base_url:
            endpoint = Endpoint(record.base_url, job=record.key, record=record)
            for name in served:
                job_endpoints.setdefault(name, []).append(endpoint)
                rows.setdefault(name, ServedModel(name, "job", "-"))
        elif record.state not in FINAL_STATES:
            starting.update(served)
    models = [
        ServedModel(
            row.name,
            row.source,
            row.engine,
            (
                *job_endpoints.get(row.name, ()),
                *((statics[row.name],) if row.name in statics else ()),
            ),
        )
        for row in rows.values()
    ]
    by_name = {m.name: m for m in models}
    for alias, target in aliases.items():
        model = by_name.get(target)
        if model is not None:
            models.append(ServedModel(alias, "alias", model.engine, model.endpoints, target))
    return Catalog(
        tuple(models),
        configured=names,
        starting=frozenset(starting - {m.name for m in models if m.endpoints}),
        aliases=aliases,
        fallbacks=fallbacks,
        pools=pools,
        limits=limits,
        on_demand=on_demand,
    )


def served_models(configured: ModelsFile | None, records: Iterable[Record]) -> list[ServedModel]:
    """Every name the gateway serves, aliases included (:func:`catalog`'s rows)."""
    return list(catalog(configured, records).models)


@dataclass(frozen=True)
class Listed:
    """One name as ``GET /v1/models`` and `mt models` list it: whether a request to it is
    answered now (``ready``, ``pool``), after a start (``starts_on_request``), or not, and
    how long its last start took (on-demand models, from the gateway's state file)."""

    model: ServedModel
    state: Availability
    starts_on_request: bool
    last_start_s: float | None = None
    created: int = 0  # the oldest ready job's creation (Unix seconds), 0 without one

    @property
    def usable(self) -> bool:
        """A request to it is answered, now or once it has started: GET /v1/models lists it."""
        return self.state in ("ready", "pool") or self.starts_on_request

    def extension(self) -> dict[str, object]:
        """The ``mt`` field of its OpenAI model object."""
        return {
            "state": self.state,
            "starts_on_request": self.starts_on_request,
            "last_start_s": self.last_start_s,
        }

    def openai(self) -> dict[str, object]:
        """Its OpenAI model object (``GET /v1/models``), with the ``mt`` extension field."""
        return {
            "id": self.model.name,
            "object": "model",
            "created": self.created,
            "owned_by": "modeltainer",
            "mt": self.extension(),
        }


def listing(
    served: Catalog,
    last_starts: Mapping[str, float] | None = None,
    *,
    starts_jobs: bool = True,
) -> list[Listed]:
    """Every name of ``served`` (aliases as their model), in its order, with its state.

    ``last_starts`` maps an on-demand model to how long its last start took (the on-demand
    state file's ``last_start_s``); ``starts_jobs`` is False for a gateway without a backend,
    which routes on-demand models like others and starts nothing.
    """
    last_starts = last_starts or {}
    rows: dict[str, Listed] = {}
    for model in served.models:
        if model.alias_of is not None:
            target = rows.get(model.alias_of)
            if target is not None:
                rows[model.name] = Listed(
                    model,
                    target.state,
                    target.starts_on_request,
                    target.last_start_s,
                    target.created,
                )
            continue
        rows[model.name] = _listed(model, served, last_starts, starts_jobs)
    return list(rows.values())


def _listed(
    model: ServedModel, served: Catalog, last_starts: Mapping[str, float], starts_jobs: bool
) -> Listed:
    on_demand = starts_jobs and model.name in served.on_demand
    # A swap pool's endpoint serves its whole catalogue, loading a model when asked for it.
    direct = [e for e in model.endpoints if e.record is None or not e.record.serves]
    state: Availability
    if direct:
        state, starts = "ready", False
    elif model.endpoints:
        state, starts = "pool", True
    elif model.name in served.starting:
        state, starts = "starting", on_demand
    elif on_demand:
        state, starts = "on_demand", True
    else:
        state, starts = "stopped", False
    created = min(
        (int(e.record.created_at) for e in model.endpoints if e.record is not None), default=0
    )
    return Listed(model, state, starts, last_starts.get(model.name), created)
