"""The job plan: what a backend hands the job wrapper (a JSON file, 0600, no secrets in it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hpc.privatefile import write_private
from hpc.spec import ModelSpec, PoolSpec


class JobPlan(BaseModel):
    """Everything the wrapper needs to serve one model and register it.

    The per-job key is not here: it lives in the job's registry record (0600), which the
    backend writes before the job starts, or which the wrapper creates for a job that was
    submitted by hand with ``sbatch``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: ModelSpec
    backend: str
    job_id: str | None = Field(default=None, description="None: read from the scheduler's env")
    nonce: str
    registry_dir: Path
    engine_host: str = "127.0.0.1"
    stop_grace_s: float = Field(default=10, gt=0)
    started_by: str | None = Field(
        default=None,
        max_length=512,
        description="who submitted the job and why; the wrapper keeps it in the record",
    )


class PoolPlan(BaseModel):
    """Everything the swap pool (``python -m hpc.job.swappool``) needs: the pool and its catalogue.

    The catalogue's specs are copied in whole, so the job does not read ``models.yaml`` (which
    may have changed, or not be on the node) and the pool serves what was submitted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool: PoolSpec
    catalogue: tuple[ModelSpec, ...] = Field(min_length=1)
    backend: str
    job_id: str | None = Field(default=None, description="None: read from the scheduler's env")
    nonce: str
    registry_dir: Path
    engine_host: str = "127.0.0.1"
    stop_grace_s: float = Field(default=10, gt=0)


def write_plan(plan: JobPlan | PoolPlan, path: Path) -> None:
    """Write the plan 0600 in a 0700 directory."""
    write_private(path, plan.model_dump_json(indent=2).encode())


def read_plan(path: Path) -> JobPlan:
    """Read a plan the backend wrote."""
    return JobPlan.model_validate_json(path.read_text(encoding="utf-8"))
