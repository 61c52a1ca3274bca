"""What the gateway serves, by name: configured models, aliases, static backends, ready jobs.

:func:`catalog` is the one place that decides which names exist and which endpoints serve
each: the gateway's route table (``/v1/models``), `mt models` and `mt export` all read it,
so they never disagree about which names exist.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from hpc.registry import FINAL_STATES, Record
from hpc.spec import ModelsFile, ModelSpec, StaticBackend, TokenLimits

Source = Literal["models.yaml", "static", "job", "alias"]


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
    model to its max_tokens default and cap (only models that set one).
    """

    models: tuple[ServedModel, ...]
    configured: tuple[str, ...] = ()
    starting: frozenset[str] = frozenset()
    aliases: Mapping[str, str] = field(default_factory=dict)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pools: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, TokenLimits] = field(default_factory=dict)

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
    statics: dict[str, Endpoint] = {}
    if configured is not None:
        names = tuple(spec.name for spec in configured.models)
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
    )


def served_models(configured: ModelsFile | None, records: Iterable[Record]) -> list[ServedModel]:
    """Every name the gateway serves, aliases included (:func:`catalog`'s rows)."""
    return list(catalog(configured, records).models)
