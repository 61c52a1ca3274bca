"""Render a model's sbatch script from its template: one pure function, golden-tested.

The templates (``hpc/slurm/templates/<engine>.sbatch``) are plain files users can read. Flags
come out sorted, one ``#SBATCH`` line each, values ``shlex.quote``d; every value that reaches
a directive was validated by the spec's patterns, so none can carry a newline (a new
directive or a shell line). The job plan goes in as JSON inside a quoted heredoc: JSON
escapes newlines in strings, so no line of it can end the heredoc early, and the quoted
delimiter means the shell expands nothing in it.
"""

from __future__ import annotations

import re
import shlex
import signal
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from hpc.job.multinode import dry_run_note
from hpc.job.plan import JobPlan, PoolPlan
from hpc.llamacppserver import describe as describe_server
from hpc.site import SlurmSite
from hpc.slurm.handoverjob import HandoverJob
from hpc.spec import Resources, Runtime, SlurmOptions

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class SbatchJob:
    """What the backend needs besides the script: the job's name and its log file pattern."""

    name: str
    log_pattern: str  # with %j for the job id

    def log_path(self, job_id: str) -> str:
        """The log file of job ``job_id``."""
        return self.log_pattern.replace("%x", self.name).replace("%j", job_id)


class Schedulable(Protocol):
    """What one allocation is asked for: a model's spec, or a swap pool's."""

    @property
    def name(self) -> str: ...

    @property
    def resources(self) -> Resources: ...

    @property
    def slurm(self) -> SlurmOptions: ...


def job_name(spec: Schedulable, nonce: str) -> str:
    """``mt-<model>-<nonce>``: users see the model in squeue; the nonce finds the job again."""
    return f"mt-{spec.name}-{nonce}"


def sbatch_flags(
    spec: Schedulable, site: SlurmSite, *, name: str, log_pattern: str, nonce: str
) -> list[tuple[str, str | None]]:
    """Every sbatch flag for ``spec`` as (flag, value) pairs, sorted by flag."""
    res = spec.resources
    opts = spec.slurm
    flags: dict[str, str | None] = {
        "--job-name": name,
        "--comment": f"mt:{nonce}",
        "--output": log_pattern,
        "--open-mode": "append",  # a requeued run appends to the same log
        "--nodes": str(res.nodes),
        "--ntasks-per-node": "1",
        "--cpus-per-task": str(res.cpus),
        "--mem": f"{round(res.mem_gb * 1024)}M",
        "--time": str(res.time_limit_min),
        "--signal": f"B:USR1@{opts.signal_grace_s}",
        "--requeue" if opts.requeue else "--no-requeue": None,
    }
    if res.gpus:
        # Slurm's --gres is per node; resources.gpus is the job's total (hpc.job.multinode).
        per_node = res.gpus // res.nodes or res.gpus
        flags["--gres"] = f"gpu:{res.gpu_type}:{per_node}" if res.gpu_type else f"gpu:{per_node}"
    for flag, value in (
        ("--partition", opts.partition or site.partition),
        ("--account", opts.account or site.account),
        ("--qos", opts.qos or site.qos),
        ("--constraint", opts.constraint),
    ):
        if value:
            flags[flag] = value
    return sorted(flags.items())


def _directive(flag: str, value: str | None) -> str:
    return f"#SBATCH {flag}" if value is None else f"#SBATCH {flag}={shlex.quote(value)}"


def template(kind: str) -> str:
    """The template text for ``kind`` (``vllm``, ``llamacpp``, or ``pool``)."""
    return (
        resources.files("hpc.slurm.templates")
        .joinpath(f"{kind}.sbatch")
        .read_text(encoding="utf-8")
    )


def _runtime_note(runtime: Runtime | None) -> str:
    if runtime is None or runtime.kind != "apptainer":
        return " directly on the node (runtime: none, no container)"
    gpu = f" {runtime.gpu_flag}" if runtime.gpu_flag else ""
    return f" inside Apptainer ({runtime.image}{gpu})"


def render(
    spec: Schedulable,
    plan: JobPlan | PoolPlan,
    site: SlurmSite,
    *,
    log_dir: Path,
    python: str,
) -> tuple[str, SbatchJob]:
    """The sbatch script for ``plan`` and the job's name and log pattern.

    ``spec`` is the plan's model (``plan.spec``), or its swap pool (``plan.pool``), whose
    script runs ``python -m hpc.job.swappool`` instead of the job wrapper.
    """
    name = job_name(spec, plan.nonce)
    log_pattern = str(log_dir / "%x-%j.log")
    flags = sbatch_flags(spec, site, name=name, log_pattern=log_pattern, nonce=plan.nonce)
    directives = [_directive(flag, value) for flag, value in flags]
    directives += [f"#SBATCH {flag}" for flag in spec.slurm.extra_directives]
    if isinstance(plan, PoolPlan):
        kind = "pool"
        runtime_note = _runtime_note(plan.pool.runtime)
        if plan.pool.runtime is None:
            runtime_note = " in the runtime its own model entry names"
    else:
        kind = plan.spec.engine
        runtime_note = _runtime_note(plan.spec.runtime)
    modules = site.modules
    values = {
        "directives": "\n".join(directives),
        "model": spec.name,
        "runtime_note": runtime_note,
        "grace_s": str(spec.slurm.signal_grace_s),
        "warning_drain_s": f"{plan.drain_budget_s(signal.SIGUSR1):g}",
        "drain_s": f"{plan.drain_budget_s(signal.SIGTERM):g}",
        "modules": (
            "module load " + " ".join(shlex.quote(m) for m in modules)
            if modules
            else "# (no `module load`: site.yaml slurm.modules sets them)"
        ),
        "python": shlex.quote(python),
        "wrapper": "hpc.job.wrapper",
        "plan": plan.model_dump_json(indent=2, exclude_defaults=True),
    }
    if isinstance(plan, JobPlan):
        values["multinode"] = dry_run_note(plan.spec)  # each node's command (vllm.sbatch)
    if isinstance(plan, JobPlan) and plan.spec.continuity == "handover":
        # The job renders its successor's script on the node: it carries what that needs.
        values["wrapper"] = "hpc.slurm.handover"
        carried = HandoverJob(plan=plan, site=site, log_dir=log_dir, python=python)
        values["plan"] = carried.model_dump_json(indent=2, exclude_defaults=True)
    if isinstance(plan, JobPlan) and plan.spec.engine == "llamacpp":
        values["llamacpp_server"] = describe_server(plan.spec, plan.llamacpp)
    if isinstance(plan, PoolPlan):
        values["catalogue"] = ", ".join(plan.pool.models)
        values["slots"] = str(plan.pool.slots)

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]  # a KeyError here is a template bug, caught by tests

    script = _PLACEHOLDER.sub(fill, template(kind))
    return script, SbatchJob(name=name, log_pattern=log_pattern)
