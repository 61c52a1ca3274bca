"""What `mt pool status` shows: swap pools (asked for their slots) and jobs started on demand.

A pool's record says where it listens; only the pool knows what it has loaded, so each live
pool is asked ``GET /pool/status`` with its job's key. Jobs the gateway started on demand
carry ``started_by`` in their record; the gateway's on-demand state file
(``hpc.ondemandstate``, beside the registry directory) adds when each was last asked for
and its idle TTL, when it exists.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from hpc import tlspin
from hpc.errors import MTError
from hpc.jobs import job_views
from hpc.ondemandstate import ModelEntry, default_path, read_ondemand_state
from hpc.registry import Record
from hpc.site import Site


@dataclass(frozen=True)
class PoolView:
    """One live pool: its record and what it said of its slots (or why it could not)."""

    record: Record
    status: dict[str, Any] | None
    error: str | None = None

    def public(self) -> dict[str, object]:
        """JSON-ready, without the key."""
        return {
            "job": self.record.key,
            "pool": self.record.model,
            "state": self.record.state,
            "base_url": self.record.base_url,
            "serves": list(self.record.serves),
            "status": self.status,
            "error": self.error,
        }


@dataclass(frozen=True)
class OnDemandView:
    """A job started on demand, with the gateway's bookkeeping for its model (if any)."""

    model: str
    job: str | None
    state: str
    started_at: float | None
    why: str | None
    last_request_at: float | None = None
    idle_ttl_s: float | None = None

    def idle_s(self, now: float) -> float | None:
        """Seconds since the last request, if the gateway recorded one."""
        return None if self.last_request_at is None else max(0.0, now - self.last_request_at)

    def public(self, now: float) -> dict[str, object]:
        """JSON-ready."""
        idle = self.idle_s(now)
        return {
            "model": self.model,
            "job": self.job,
            "state": self.state,
            "started_at": self.started_at,
            "why": self.why,
            "last_request_at": self.last_request_at,
            "idle_s": None if idle is None else round(idle, 1),
            "idle_ttl_s": self.idle_ttl_s,
        }


def status_url(record: Record) -> str:
    """``http://node:port/v1`` → ``http://node:port/pool/status``."""
    base = (record.base_url or "").rstrip("/")
    return base.removesuffix("/v1") + "/pool/status"


def fetch_pool_status(record: Record, timeout_s: float = 5.0) -> PoolView:
    """Ask a ready pool for its slots; an unreachable pool is reported, not raised.

    The pool's certificate is pinned as its record says (hpc.tlspin): an impostor on its
    port is reported, and gets no key."""
    if record.state != "ready" or not record.base_url:
        return PoolView(record, None, f"pool is {record.state}")
    url = status_url(record)
    conn = tlspin.connection(url, record.tls_sha256, timeout_s)
    headers = {"Authorization": f"Bearer {record.api_key.get_secret_value()}"}
    try:
        conn.request("GET", urlsplit(url).path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return PoolView(record, None, f"{url} answered {response.status}")
        data = json.loads(body)
    except MTError as exc:
        return PoolView(record, None, exc.message)
    except (http.client.HTTPException, OSError, ValueError) as exc:
        return PoolView(record, None, f"cannot reach {url}: {exc}")
    finally:
        conn.close()
    if not isinstance(data, dict):
        return PoolView(record, None, f"{url} answered no JSON object")
    return PoolView(record, data)


_ENDED = ("gone", "cancelled", "failed", "idle")


def on_demand_views(records: list[Record], state: Mapping[str, ModelEntry]) -> list[OnDemandView]:
    """Live records with ``started_by``, joined with the gateway's entry for their model.

    The gateway's state file (``gateway/ondemand/statefile.py`` writes it) keeps per model
    its idle clock and its jobs. A job the file knows but with no live record yet (submitted
    a moment ago) is shown by itself, and so is a model being submitted, unless its state
    says it ended.
    """
    views: list[OnDemandView] = []
    shown: set[str] = set()
    for record in records:
        if record.started_by is None:
            continue
        entry = state.get(record.model)
        job = next((j for j in entry.jobs if j.job == record.key), None) if entry else None
        if job is None:
            entry = None  # the gateway's entry is about other jobs of the model
        shown.add(record.key)
        views.append(
            OnDemandView(
                model=record.model,
                job=record.key,
                state=record.state,
                started_at=(job.started_at if job else None) or record.created_at,
                why=record.started_by,
                last_request_at=entry.last_request_at if entry else None,
                idle_ttl_s=entry.idle_ttl_s if entry else None,
            )
        )
    for model, entry in state.items():
        if not entry.jobs and entry.state not in _ENDED:
            # Being submitted: no job id yet.
            views.append(_view(model, entry, None, entry.state, None, None))
        for job in entry.jobs:
            if job.job in shown or job.state in _ENDED:
                continue
            views.append(_view(model, entry, job.job, job.state, job.started_at, job.why))
    return views


def _view(
    model: str,
    entry: ModelEntry,
    job: str | None,
    state: str,
    started_at: float | None,
    why: str | None,
) -> OnDemandView:
    return OnDemandView(
        model=model,
        job=job,
        state=state,
        started_at=started_at,
        why=why,
        last_request_at=entry.last_request_at,
        idle_ttl_s=entry.idle_ttl_s,
    )


@dataclass(frozen=True)
class PoolReport:
    """Everything `mt pool status` shows."""

    pools: list[PoolView]
    on_demand: list[OnDemandView]
    taken_at: float

    def public(self) -> dict[str, object]:
        """JSON-ready (no keys)."""
        return {
            "pools": [p.public() for p in self.pools],
            "on_demand": [v.public(self.taken_at) for v in self.on_demand],
        }


def pool_report(site: Site, timeout_s: float = 5.0) -> PoolReport:
    """Live pools (each asked for its slots) and on-demand jobs, checked against schedulers."""
    records = [view.record for view in job_views(site, include_final=False)]
    pools = [fetch_pool_status(r, timeout_s) for r in records if r.engine == "pool"]
    state = read_ondemand_state(default_path(site.registry_dir))
    return PoolReport(pools, on_demand_views(records, state), time.time())
