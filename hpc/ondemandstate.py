"""The on-demand state file, typed: the gateway writes it, `mt pool status` reads it.

``$MT_HOME/ondemand-state.json`` (next to the registry directory) holds what the gateway
knows of the models it starts on demand: per model its phase, idle clock and last failure,
and the jobs it started with why and how busy each is. The gateway rewrites it atomically
(0600) whenever that changes, so a reader sees a whole file or none.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

STATE_FILE = "ondemand-state.json"


def default_path(registry_dir: Path) -> Path:
    """Where the gateway publishes the file unless told otherwise: beside the registry."""
    return registry_dir.parent / STATE_FILE


class JobEntry(BaseModel):
    """One job the gateway started on demand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: str  # the registry record's key
    state: str  # pending (reason) · starting · ready · stopping · …
    started_at: float | None = None
    why: str | None = None  # the record's started_by
    in_flight: int = 0  # requests in flight to it
    node: str | None = None


class ModelEntry(BaseModel):
    """One on-demand model: its phase, idle clock, last failure and jobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: str  # idle · submitting · pending … · starting · ready · failed · stopping
    # int | float: the TTL is written as models.yaml gives it (300, not 300.0).
    idle_ttl_s: int | float | None = None
    last_request_at: float | None = None
    idle_for_s: float | None = None  # None while requests are in flight
    in_flight: int = 0
    error: str | None = None  # the last failed start, while it is remembered
    failed_at: float | None = None
    # Seconds from submit to ready of the last job that became ready (queue wait included).
    last_start_s: float | None = None
    jobs: list[JobEntry] = []


class OnDemandState(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    updated_at: float
    gateway_pid: int
    backend: str | None
    models: dict[str, ModelEntry]


def read_ondemand_state(path: Path) -> dict[str, ModelEntry]:
    """The gateway's per-model on-demand bookkeeping; empty if the file is absent or bad.

    The gateway rewrites it atomically, so a bad file is another program's, not a torn one;
    status output should not fail for it.
    """
    try:
        return OnDemandState.model_validate_json(path.read_bytes()).models
    except (OSError, ValidationError):
        return {}
