"""What the gateway would serve, by name: configured models, static backends and ready jobs.

`mt models` lists it and `mt export` writes it into other tools' configs; both read it here,
so the two never disagree about which names exist.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from hpc.registry import Record
from hpc.spec import ModelsFile

Source = Literal["models.yaml", "static", "job"]


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI root (``…/v1``) serving a name, and where its key lives (never the key)."""

    base_url: str
    job: str | None = None  # the registry record key of the job whose engine this is
    api_key_env: str | None = None  # a static backend's key: this environment variable


@dataclass(frozen=True)
class ServedModel:
    """A name the gateway routes, where it was declared, and its endpoints ready now."""

    name: str
    source: Source
    engine: str
    endpoints: tuple[Endpoint, ...] = ()


def served_models(configured: ModelsFile | None, records: Iterable[Record]) -> list[ServedModel]:
    """Configured models, then static backends (a static entry replaces a model of the same
    name), then names only running jobs serve; each with the endpoints of its ready jobs
    (a ready swap pool is an endpoint of every name in its ``serves``)."""
    rows: dict[str, ServedModel] = {}
    if configured is not None:
        for spec in configured.models:
            rows[spec.name] = ServedModel(spec.name, "models.yaml", spec.engine)
        for static in configured.static:
            endpoint = Endpoint(static.base_url, api_key_env=static.api_key_env)
            rows[static.name] = ServedModel(static.name, "static", "-", (endpoint,))
    for record in records:
        if record.state != "ready" or not record.base_url:
            continue
        endpoint = Endpoint(record.base_url, job=record.key)
        for name in record.serves or (record.model,):  # a swap pool serves its catalogue
            row = rows.get(name) or ServedModel(name, "job", "-")
            rows[name] = ServedModel(row.name, row.source, row.engine, (*row.endpoints, endpoint))
    return list(rows.values())
