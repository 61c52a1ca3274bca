"""The job plan: what a backend hands the job wrapper (a JSON file, 0600, no secrets in it).

Besides the spec, a plan says how the job ends. On a stop signal the job drains: its record
goes ``draining`` (the gateway sends it nothing new) and requests in flight may finish for
a budget, then the engine is stopped (TERM's stand-in SIGINT, KILL after ``stop_grace_s``):

- after TERM or INT (scancel, preemption, `mt cancel`), ``drain_s`` (the spec's);
- after USR1 or USR2 (Slurm's ``--signal=B:USR1@N`` warning, N s before the time limit),
  ``warning_drain_s``: N minus ``stop_grace_s`` minus a margin (:func:`warning_drain_s`),
  set by the Slurm backend; unset, ``drain_s``.

A later signal can only shorten the budget (Slurm's TERM at the time limit, after its USR1).
"""

from __future__ import annotations

import signal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpc.llamacppserver import LlamaCppServer
from hpc.privatefile import write_private
from hpc.spec import DEFAULT_DRAIN_S, ModelSpec, PoolSpec
from hpc.stagingsite import StagingSite

DEFAULT_STOP_GRACE_S = 10.0
# Left between the end of the drain and the engine's stop: record writes, process-tree walks.
STOP_MARGIN_S = 5.0
_WARNING_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2})


def warning_drain_s(lead_s: float, stop_grace_s: float = DEFAULT_STOP_GRACE_S) -> float:
    """The drain budget after a warning ``lead_s`` before the end (``--signal=B:USR1@lead_s``).

    The engine must be stopped (up to ``stop_grace_s``) before Slurm's time limit, with a
    margin: 120 s of warning leave 105 s for requests in flight.
    """
    return max(0.0, lead_s - stop_grace_s - STOP_MARGIN_S)


class _Ending(BaseModel):
    """How a job ends: the drain budgets and the engine's stop grace (see the module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stop_grace_s: float = Field(default=DEFAULT_STOP_GRACE_S, gt=0)
    drain_s: float = Field(
        default=DEFAULT_DRAIN_S, ge=0, description="after TERM/INT: requests in flight finish"
    )
    warning_drain_s: float | None = Field(
        default=None, ge=0, description="after USR1/USR2; None: drain_s"
    )

    def drain_budget_s(self, signum: int) -> float:
        """How long requests in flight may finish after ``signum``."""
        if signum in _WARNING_SIGNALS and self.warning_drain_s is not None:
            return self.warning_drain_s
        return self.drain_s


class JobPlan(_Ending):
    """Everything the wrapper needs to serve one model and register it.

    The per-job key is not here: it lives in the job's registry record (0600), which the
    backend writes before the job starts, or which the wrapper creates for a job that was
    submitted by hand with ``sbatch``.
    """

    spec: ModelSpec
    backend: str
    job_id: str | None = Field(default=None, description="None: read from the scheduler's env")
    nonce: str
    registry_dir: Path
    engine_host: str = "127.0.0.1"
    started_by: str | None = Field(
        default=None,
        max_length=512,
        description="who submitted the job and why; the wrapper keeps it in the record",
    )
    staging: StagingSite | None = Field(
        default=None,
        description="copy the weights into the node-local cache first (hpc.job.staging); "
        "None: the engine reads weights.source",
    )
    predecessor: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="continuity: handover: the job id this job takes over from",
    )
    llamacpp: LlamaCppServer | None = Field(
        default=None,
        description="the llama.cpp server chosen at submit (hpc.llamacppserver); None: the "
        "first found on the node, or no llama.cpp model outside a container",
    )


class ClusterServe(BaseModel):
    """How a pool serves inside a Kubernetes pod: plain HTTP on the pod's port, the key from
    its environment (a Secret), no registry record (the Deployment's status is the record)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(gt=0, lt=65536)
    key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$", description="holds the per-job key")


class PoolPlan(_Ending):
    """Everything the swap pool (``python -m hpc.job.swappool``) needs: the pool and its catalogue.

    The catalogue's specs are copied in whole, so the job does not read ``models.yaml`` (which
    may have changed, or not be on the node) and the pool serves what was submitted.
    """

    pool: PoolSpec
    catalogue: tuple[ModelSpec, ...] = Field(min_length=1)
    backend: str
    job_id: str | None = Field(default=None, description="None: read from the scheduler's env")
    nonce: str
    registry_dir: Path | None = Field(default=None, description="None only with ``cluster``")
    engine_host: str = "127.0.0.1"
    llamacpp: LlamaCppServer | None = Field(
        default=None,
        description="the llama.cpp server chosen at submit (hpc.llamacppserver); None: the "
        "first found on the node, or no llama.cpp model outside a container",
    )
    cluster: ClusterServe | None = Field(
        default=None, description="Kubernetes: serve in the pod (hpc.k8s.pool), no record"
    )

    @model_validator(mode="after")
    def _one_way_to_serve(self) -> PoolPlan:
        if (self.registry_dir is None) == (self.cluster is None):
            raise ValueError("a pool plan has either registry_dir (a job's front) or cluster")
        return self


def write_plan(plan: JobPlan | PoolPlan, path: Path) -> None:
    """Write the plan 0600 in a 0700 directory."""
    write_private(path, plan.model_dump_json(indent=2).encode())


def read_plan(path: Path) -> JobPlan:
    """Read a plan the backend wrote."""
    return JobPlan.model_validate_json(path.read_text(encoding="utf-8"))
