"""The route table: which upstreams serve which model name, as one immutable snapshot.

The reloader builds a new table whenever the registry or ``models.yaml`` changes and swaps
it in whole; requests only read the table they picked up, so they never see half an update.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from hpc.catalog import Catalog, Endpoint, catalog
from hpc.registry import Record
from hpc.spec import ModelsFile
from hpc.specserving import TokenLimits


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible endpoint and the key the gateway sends it.

    ``base_url`` is the endpoint's OpenAI root (ending in ``/v1``); ``source`` says where it
    came from (a registry record key, or ``static:<name>``) for logs. ``engine`` is set for
    a job's endpoint only: those are probed in the background (``gateway.health``), static
    backends are judged by their answers alone.
    """

    model: str
    base_url: str
    api_key: str | None = field(repr=False)
    source: str
    created: int = 0
    engine: str | None = None
    health_path: str | None = None
    tls_sha256: str | None = None  # a job's front: its certificate, pinned (hpc.tlspin)

    @classmethod
    def of_job(cls, record: Record, name: str | None = None) -> Upstream:
        """The upstream of a job's engine (its front): key, engine, health path, pin."""
        if record.base_url is None:
            raise ValueError(f"record {record.key} has no base_url")
        return cls(
            model=name or record.model,
            base_url=record.base_url,
            api_key=record.api_key.get_secret_value(),
            source=record.key,
            created=int(record.created_at),
            engine=record.engine,
            health_path=record.health_path,
            tls_sha256=record.tls_sha256,
        )

    def url(self, suffix: str) -> str:
        """``http://node:port/v1`` + ``/chat/completions``."""
        return self.base_url.rstrip("/") + suffix


class RouteTable:
    """Routable names with their upstreams, plus names that are known but not ready.

    ``aliases`` maps another name to the model it stands for; ``fallbacks`` maps a model
    to the names to serve instead, in order, when none of its replicas answers. Both come
    from ``models.yaml`` (validated there: no alias clashes, no fallback to nothing).
    ``pools`` maps a catalogue name to the swap pool that serves it (for the 503's hint).
    ``limits`` maps a model to its max_tokens default and cap; ``catalog`` is what the
    table was built from (``GET /v1/models`` lists it, see ``hpc.catalog.listing``).
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[Upstream, ...]],
        configured: Iterable[str] = (),
        starting: Iterable[str] = (),
        warnings: Iterable[str] = (),
        aliases: Mapping[str, str] | None = None,
        fallbacks: Mapping[str, tuple[str, ...]] | None = None,
        pools: Mapping[str, str] | None = None,
        limits: Mapping[str, TokenLimits] | None = None,
        catalog: Catalog | None = None,
    ) -> None:
        self._routes = dict(routes)
        self._configured = frozenset(configured)
        self._starting = frozenset(starting)
        self.warnings = tuple(warnings)
        self._aliases = dict(aliases or {})
        self._fallbacks = dict(fallbacks or {})
        self._pools = dict(pools or {})
        self._limits = dict(limits or {})
        self.catalog = catalog or Catalog(())
        # The only mutable part: where each name's round robin stands. It restarts with
        # every new table, which only shifts which replica goes first.
        self._turns = {name: itertools.count() for name in self._routes}

    def names(self) -> list[str]:
        """Every routable name, aliases of routable models included, sorted."""
        aliases = [alias for alias, model in self._aliases.items() if model in self._routes]
        return sorted([*self._routes, *aliases])

    def resolve(self, name: str) -> str:
        """The model ``name`` stands for: itself, or the model it is an alias of."""
        return self._aliases.get(name, name)

    def fallbacks(self, model: str) -> tuple[str, ...]:
        """The models to serve instead of ``model`` (aliases resolved), in order."""
        return tuple(self.resolve(name) for name in self._fallbacks.get(model, ()))

    def limits(self, model: str) -> TokenLimits | None:
        """The max_tokens default and cap of ``model`` (not an alias), if it sets any."""
        return self._limits.get(model)

    def upstreams(self, model: str) -> tuple[Upstream, ...]:
        """The upstreams of ``model`` in a stable order (empty if none is ready)."""
        return self._routes.get(model, ())

    def pick(self, model: str) -> tuple[Upstream, ...]:
        """The upstreams of ``model``, rotated one step per call (round robin).

        The first is the one to use; the rest are the fallbacks, in order, when it cannot
        be reached.
        """
        candidates = self._routes.get(model, ())
        if len(candidates) <= 1:
            return candidates
        start = next(self._turns[model]) % len(candidates)
        return candidates[start:] + candidates[:start]

    def replicas(self) -> dict[str, Upstream]:
        """Every upstream by its source, once (a source may serve several names)."""
        return {u.source: u for ups in self._routes.values() for u in ups}

    def is_known(self, model: str) -> bool:
        """True for a name in ``models.yaml`` or with a job on its way, routable or not."""
        return (
            model in self._configured
            or model in self._starting
            or model in self._routes
            or model in self._aliases
        )

    def submit_name(self, model: str) -> str:
        """What to `mt submit` to serve ``model``: the first pool whose catalogue has it, or
        the model itself."""
        return self._pools.get(model, model)

    def is_starting(self, model: str) -> bool:
        """True if a job for ``model`` exists but is not ready (pending, starting, draining)."""
        return model in self._starting


def _upstream(name: str, endpoint: Endpoint, env: Mapping[str, str]) -> Upstream:
    """The upstream for one of ``name``'s catalog endpoints, with the key the gateway sends."""
    record = endpoint.record
    if record is not None:
        return Upstream.of_job(record, name)
    key = env.get(endpoint.api_key_env) if endpoint.api_key_env is not None else None
    return Upstream(
        model=name, base_url=endpoint.base_url, api_key=key or None, source=f"static:{name}"
    )


def build_routes(
    records: Iterable[Record],
    models: ModelsFile | None,
    env: Mapping[str, str],
) -> RouteTable:
    """A table from the registry's records and the static backends of ``models.yaml``.

    Which names exist and which endpoints serve them is :func:`hpc.catalog.catalog`'s
    answer (the one `mt models` and `mt export` use): only ``ready`` records with a base URL
    route, other live records make their name known, so a request gets 503 (retry later)
    rather than 404. A static backend's key comes from the environment variable it names.
    """
    served = catalog(models, records)
    warnings = [
        f"static backend {static.name!r}: environment variable "
        f"{static.api_key_env} is not set; sending no key"
        for static in (models.static if models is not None else ())
        if static.api_key_env is not None and not env.get(static.api_key_env)
    ]
    return RouteTable(
        {
            name: tuple(_upstream(name, endpoint, env) for endpoint in endpoints)
            for name, endpoints in served.routable().items()
        },
        configured=served.configured,
        starting=served.starting,
        warnings=warnings,
        aliases=served.aliases,
        fallbacks=served.fallbacks,
        pools=served.pools,
        limits=served.limits,
        catalog=served,
    )
