"""A Python function as a Slurm job: submit it with submitit, wait without sacct, return.

``run_function`` asks for the site's partition, account, QOS and modules, submits
``fn(**kwargs)`` and returns a ``FunctionJobResult``: ok with the function's return value,
rejected by sbatch, still pending (cancelled, with Slurm's reason and a hint), timed out,
or failed. submitit learns job states from ``sacct``. Where accounting is off, every call
fails, submitit logs "Bypassing sacct error" and calls the state ``UNKNOWN``, and a job
that dies without a result is waited for forever. So this never asks submitit for a
state: squeue (``SlurmClient.jobs``) says pending, running or gone; the result pickle says
done. `mt doctor`'s probe (``hpc.slurm.probejob``) and `mt bench --backend slurm` use it.
"""

from __future__ import annotations

import contextlib
import io
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hpc.errors import MTError, SlurmError
from hpc.site import Site
from hpc.slurm.client import (
    PENDING_STATES,
    RUNNING_STATES,
    SlurmAPI,
    SlurmClient,
    SlurmJob,
    hint_for,
)
from hpc.transport import CommandTimeout, LocalTransport

if TYPE_CHECKING:
    import submitit  # imported where used: callers that never submit do without it

_POLL_S = 1.0
_RUNNING_GRACE_S = 60.0  # a job that started just before the timeout gets this long to end
_RESULT_GRACE_S = 15.0  # the result file may show up late on NFS (submitit waits as long)
_CANCEL_WAIT_S = 20.0

# Slurm's pending reasons (squeue's REASON column), with what the user can do about them.
_PENDING_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"^(Resources|Priority)$"),
        "the partition is busy: try a longer --timeout "
        "or another --partition (`sinfo -s` shows free nodes)",
    ),
    (re.compile(r"^JobHeld"), "the job was held (`scontrol release <job>` lets a held job run)"),
    (
        re.compile(r"ReqNodeNotAvail|NodeDown|Reservation"),
        "the nodes it needs are down, drained or reserved: `sinfo -R` shows why",
    ),
    (
        re.compile(r"^Partition"),
        "the partition is down, inactive or its limits forbid the "
        "request: `scontrol show partition` shows its state and limits",
    ),
    (
        re.compile(r"^(Assoc|QOS)"),
        "an account or QOS limit holds the job: `sacctmgr show assoc user=$USER` shows your limits",
    ),
    (
        re.compile(r"BadConstraints"),
        "no node has all it asked for: `sinfo -o '%P %c %m %G'` shows CPUs, memory (MB) and GPUs",
    ),
)

Outcome = Literal["ok", "rejected", "pending", "timeout", "failed"]


@dataclass(frozen=True)
class JobSpec:
    """What the job asks Slurm for, besides the site's account, QOS and modules."""

    job_name: str
    comment: str
    time_limit_min: int
    gpus: int = 0
    cpus: int = 1
    mem: str = "1G"
    partition: str | None = None  # None: the site's partition


@dataclass(frozen=True)
class FunctionJobResult:
    """What became of the job, and what the function returned (``value``, when ok)."""

    outcome: Outcome
    job_id: str | None
    partition: str | None
    waited_s: float
    state: str = ""  # Slurm's last word on the job (PENDING, RUNNING, COMPLETED, …)
    reason: str = ""  # the pending reason, sbatch's error, or why the job failed
    hint: str | None = None
    cancelled: bool = False
    log_path: str | None = None
    value: Any = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (``value`` as it is)."""
        return asdict(self)


def run_function(
    site: Site,
    fn: Callable[..., Any],
    kwargs: Mapping[str, Any],
    *,
    spec: JobSpec,
    timeout_s: float,
    folder: Path,
    client: SlurmAPI | None = None,
    sbatch_extra: Mapping[str, str | bool] | None = None,
) -> FunctionJobResult:
    """Submit ``fn(**kwargs)`` with submitit and wait up to ``timeout_s`` for its value.

    The job runs the site's ``module load``s and Python. Job files go to a new directory
    under ``folder`` (0700, shared with the nodes). A job still pending at the timeout is
    cancelled and reported with its reason; a running one gets a grace period, then is
    cancelled. sbatch refusing the job is an outcome (``rejected``), not an exception.
    ``sbatch_extra`` adds sbatch flags (tests hold a job with ``{"hold": True}``).
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    slurm = site.config.slurm
    api = client or SlurmClient(LocalTransport(), timeout_s=slurm.command_timeout_s)
    chosen = spec.partition or slurm.partition
    # One directory per job: submitit's temporary files have random names, so a
    # rejected job's leftovers can be removed without touching a concurrent job's.
    run_dir = private_dir(folder) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    executor = _executor(site, private_dir(run_dir), replace(spec, partition=chosen), sbatch_extra)
    template = FunctionJobResult(outcome="failed", job_id=None, partition=chosen, waited_s=0)
    started = time.monotonic()
    try:
        # submitit prints sbatch's stderr when sbatch fails; it is in the exception as well.
        with contextlib.redirect_stderr(io.StringIO()):
            job = executor.submit(fn, **kwargs)
    except FailedJobError as exc:  # sbatch exited non-zero: its stderr is the message
        shutil.rmtree(run_dir, ignore_errors=True)  # only submitit's temporary files
        message = str(exc).strip()
        return replace(
            template,
            outcome="rejected",
            waited_s=time.monotonic() - started,
            reason=_sbatch_error(message),
            hint=hint_for(message) or "`sinfo -s` lists partitions; `sinfo -o '%P %G'` their GPUs",
        )
    except (FailedSubmissionError, OSError) as exc:
        raise SlurmError(f"could not submit {spec.job_name}: {exc}", argv=["sbatch"]) from exc
    template = replace(template, job_id=str(job.job_id), log_path=str(job.paths.stdout))
    return _await_result(job, api, template, started=started, timeout_s=timeout_s)


def _executor(
    site: Site,
    run_dir: Path,
    spec: JobSpec,
    sbatch_extra: Mapping[str, str | bool] | None,
) -> submitit.SlurmExecutor:
    """A submitit executor with the site's settings and ``spec``'s request."""
    import submitit

    slurm = site.config.slurm
    python = slurm.python or sys.executable
    try:
        executor = submitit.SlurmExecutor(folder=run_dir, python=shlex.quote(python))
    except RuntimeError as exc:  # submitit found no srun on PATH
        raise SlurmError(
            f"cannot submit {spec.job_name}: {exc}",
            hint="run mt on a Slurm login node (some sites need `module load slurm`)",
        ) from exc
    params: dict[str, Any] = {
        "job_name": spec.job_name,
        "time": spec.time_limit_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": spec.cpus,
        "mem": spec.mem,
        "signal_delay_s": 30,
        "stderr_to_stdout": True,
        "comment": spec.comment,
        "wckey": None,  # submitit would tag the job with its own wckey, "submitit"
    }
    for key, value in (
        ("partition", spec.partition),
        ("account", slurm.account),
        ("qos", slurm.qos),
    ):
        if value:
            params[key] = value
    if spec.gpus:
        params["gres"] = f"gpu:{spec.gpus}"
    if slurm.modules:
        params["setup"] = ["module load " + " ".join(shlex.quote(m) for m in slurm.modules)]
    if sbatch_extra:
        params["additional_parameters"] = dict(sbatch_extra)
    executor.update_parameters(**params)
    return executor


def _await_result(
    job: submitit.Job[Any],
    api: SlurmAPI,
    template: FunctionJobResult,
    *,
    started: float,
    timeout_s: float,
) -> FunctionJobResult:
    """Poll the result file and squeue (never sacct) until a result, an end or the timeout."""
    from submitit.core.utils import UncompletedJobError

    job_id = str(job.job_id)
    log = Path(str(template.log_path))
    failed_hint = (
        "the job log says more; a Python the node cannot run is the usual cause "
        "(slurm.python and slurm.modules in site.yaml)"
    )
    deadline = started + timeout_s
    extended = False
    last: SlurmJob | None = None
    ended_at: float | None = None
    while True:
        now = time.monotonic()
        if job.paths.result_pickle.exists():
            # The result is there, so result() returns without asking sacct for a state.
            try:
                value = job.result()
            except UncompletedJobError as exc:  # the function (or unpickling it) raised
                return replace(
                    template,
                    waited_s=now - started,
                    state="FAILED",
                    reason=_last_lines(str(exc)),
                    hint=failed_hint,
                )
            return replace(
                template, outcome="ok", waited_s=now - started, state="COMPLETED", value=value
            )
        try:
            info: SlurmJob | None = api.jobs([job_id]).get(job_id)
            known = True
        except CommandTimeout:
            info, known = last, False  # squeue is slow: the job's state is unknown, not gone
        last = info or last
        active = info is not None and info.state in PENDING_STATES | RUNNING_STATES
        if known and not active:
            ended_at = ended_at or now
            if now - ended_at > _RESULT_GRACE_S:
                state = last.state if last is not None else "gone from squeue"
                return replace(
                    template,
                    waited_s=now - started,
                    state=state,
                    reason=f"the job ended ({state}) without a result: {_log_tail(log)}",
                    hint=failed_hint,
                )
        elif now > deadline and last is not None and last.state in PENDING_STATES:
            reason = last.reason if last.reason not in ("", "None") else last.state
            return replace(
                template,
                outcome="pending",
                waited_s=now - started,
                state=last.state,
                reason=reason,
                hint=pending_hint(reason),
                cancelled=_cancel(api, job_id),
                log_path=None,  # a job that never ran has no log
            )
        elif now > deadline and not extended:
            extended, deadline = True, now + _RUNNING_GRACE_S
        elif now > deadline:
            return replace(
                template,
                outcome="timeout",
                waited_s=now - started,
                state=last.state if last else "UNKNOWN",
                reason=f"the job ran but returned nothing within {now - started:.0f}s: "
                f"{_log_tail(log)}",
                hint="the node may be slow to import Python from a shared filesystem; "
                "see the job log",
                cancelled=_cancel(api, job_id),
            )
        time.sleep(_POLL_S)


def pending_hint(reason: str) -> str:
    """What to do about a job Slurm keeps pending for ``reason``."""
    hint = next((h for pattern, h in _PENDING_HINTS if pattern.search(reason)), None)
    return hint or f"`scontrol show job <id>` explains the reason {reason!r}"


def _sbatch_error(message: str) -> str:
    """sbatch's own words, without its "sbatch: error:" prefixes."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    cleaned = [re.sub(r"^sbatch: error: (Batch job submission failed: )?", "", ln) for ln in lines]
    return "; ".join(cleaned) or "sbatch failed"


def _cancel(api: SlurmAPI, job_id: str) -> bool:
    """scancel, then wait until squeue no longer shows the job pending or running."""
    try:
        api.scancel(job_id)
    except (SlurmError, CommandTimeout):
        return False
    deadline = time.monotonic() + _CANCEL_WAIT_S
    while time.monotonic() < deadline:
        try:
            job = api.jobs([job_id]).get(job_id)
        except CommandTimeout:
            time.sleep(0.5)  # squeue is slow: ask again
            continue
        if job is None or job.state not in PENDING_STATES | RUNNING_STATES:
            return True
        time.sleep(0.5)
    return False


def private_dir(path: Path) -> Path:
    """``path``, created 0700 (or tightened to it); a path sbatch cannot take is refused."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in str(path)):
        # A newline would end the #SBATCH --output line early and leave half a path as
        # a line of shell in the job script.
        raise MTError(
            f"the job directory {str(path)!r} has a control character in its path",
            hint="set log_dir in site.yaml (or MT_HOME) to a path without newlines",
        )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise MTError(
            f"cannot use {path} for the job's files: {exc.strerror}",
            hint="set log_dir in site.yaml to a directory you own on a filesystem "
            "the compute nodes share",
        ) from exc
    return path


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"no log at {path}"
    return _last_lines(text, lines) or f"empty log {path}"


def _last_lines(text: str, lines: int = 5) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:] if ln.strip())
