"""Render a model's sbatch script from its template: one pure function, golden-tested.

The templates (``hpc/templates/<engine>.sbatch``) are plain files users can read. Flags
come out sorted, one ``#SBATCH`` line each, values ``shlex.quote``d; every value that reaches
a directive was validated by the spec's patterns, so none can carry a newline (a new
directive or a shell line). The job plan goes in as JSON inside a quoted heredoc: JSON
escapes newlines in strings, so no line of it can end the heredoc early, and the quoted
delimiter means the shell expands nothing in it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hpc.jobplan import JobPlan
from hpc.site import SlurmSite
from hpc.spec import ModelSpec

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclass(frozen=True)
class SbatchJob:
    """What the backend needs besides the script: the job's name and its log file pattern."""

    name: str
    log_pattern: str  # with %j for the job id

    def log_path(self, job_id: str) -> str:
        """The log file of job ``job_id``."""
        return self.log_pattern.replace("%x", self.name).replace("%j", job_id)


def job_name(spec: ModelSpec, nonce: str) -> str:
    """``mt-<model>-<nonce>``: users see the model in squeue; the nonce finds the job again."""
    return f"mt-{spec.name}-{nonce}"


def sbatch_flags(
    spec: ModelSpec, site: SlurmSite, *, name: str, log_pattern: str, nonce: str
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
        flags["--gres"] = f"gpu:{res.gpu_type}:{res.gpus}" if res.gpu_type else f"gpu:{res.gpus}"
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


def template(engine: str) -> str:
    """The template text for ``engine`` (``vllm`` or ``llamacpp``)."""
    return resources.files("hpc.templates").joinpath(f"{engine}.sbatch").read_text(encoding="utf-8")


def render(
    spec: ModelSpec,
    plan: JobPlan,
    site: SlurmSite,
    *,
    log_dir: Path,
    python: str,
) -> tuple[str, SbatchJob]:
    """The sbatch script for ``plan`` and the job's name and log pattern."""
    name = job_name(spec, plan.nonce)
    log_pattern = str(log_dir / "%x-%j.log")
    flags = sbatch_flags(spec, site, name=name, log_pattern=log_pattern, nonce=plan.nonce)
    directives = [_directive(flag, value) for flag, value in flags]
    directives += [f"#SBATCH {flag}" for flag in spec.slurm.extra_directives]
    runtime = spec.runtime
    runtime_note = " directly on the node (runtime: none, no container)"
    if runtime.kind == "apptainer":
        gpu = f" {runtime.gpu_flag}" if runtime.gpu_flag else ""
        runtime_note = f" inside Apptainer ({runtime.image}{gpu})"
    modules = site.modules
    values = {
        "directives": "\n".join(directives),
        "model": spec.name,
        "runtime_note": runtime_note,
        "grace_s": str(spec.slurm.signal_grace_s),
        "modules": (
            "module load " + " ".join(shlex.quote(m) for m in modules)
            if modules
            else "# (no `module load`: site.yaml slurm.modules sets them)"
        ),
        "python": shlex.quote(python),
        "plan": plan.model_dump_json(indent=2, exclude_defaults=True),
    }

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]  # a KeyError here is a template bug, caught by tests

    script = _PLACEHOLDER.sub(fill, template(spec.engine))
    return script, SbatchJob(name=name, log_pattern=log_pattern)
