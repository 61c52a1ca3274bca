"""Wall-time handover on Slurm (``python -m hpc.slurm.handover --plan -``): the job wrapper
with a successor submitter.

A ``continuity: handover`` job's script runs this instead of ``hpc.job.wrapper``: the same
wrapper (hpc.job.wrapper), handed :class:`SlurmSuccessors`, which submits the successor from
the node with ``sbatch`` (compute nodes run Slurm's client commands; the job's own
``SLURM_*`` variables are left out so they do not leak into it), learns the job's end from
``squeue``, and writes the successor's ``pending`` record, as `mt submit` would. When and how
often is hpc.job.handover's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

from hpc.errors import SlurmError
from hpc.job.wrapper import JobWrapper
from hpc.registry import Registry, pending_record
from hpc.slurm.client import SlurmClient
from hpc.slurm.handoverjob import HandoverJob
from hpc.slurm.sbatch import SbatchJob, render
from hpc.transport import CommandTimeout, LocalTransport

# The job's own variables sbatch would read as its input (SLURM_* and SBATCH_*) stay out of
# the successor's submission; SLURM_CONF (which cluster) stays in.
_KEEP = frozenset({"SLURM_CONF"})


def submit_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without this job's Slurm variables, for sbatch run inside the job."""
    return {
        name: value
        for name, value in environ.items()
        if name in _KEEP or not name.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))
    }


def parse_end_time(text: str) -> float | None:
    """squeue's ``%e`` (``2026-12-05T12:03:00``, local time) as epoch seconds; None if it is
    not a time (``N/A``, ``Unknown``: no limit)."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


@contextlib.contextmanager
def _answered() -> Iterator[None]:
    """A Slurm command that timed out is a SlurmError here: the handover looks again later
    (an sbatch that timed out is found by its nonce then)."""
    try:
        yield
    except CommandTimeout as exc:
        raise SlurmError(
            f"{exc.argv[0]} did not answer within {exc.timeout_s:g}s",
            argv=exc.argv,
            hint="the Slurm controller is slow; the job wrapper tries again",
        ) from exc


class SlurmSuccessors:
    """Submits a handover job's successor with sbatch, from the node (hpc.job.handover)."""

    backend = "slurm"

    def __init__(self, job: HandoverJob, client: SlurmClient) -> None:
        self.job = job
        self.client = client

    def end_time(self, job_id: str) -> float | None:
        """The job's end (its start plus its time limit) as squeue says."""
        with _answered():
            result = self.client.run(["squeue", "--noheader", "--jobs", job_id, "--format=%e"])
        return parse_end_time(result.stdout)

    def find(self, nonce: str) -> str | None:
        """The job a previous look submitted with ``nonce`` (its comment is ``mt:<nonce>``)."""
        with _answered():
            found = self.client.find_by_comment(f"mt:{nonce}")
        return None if found is None else found.job_id

    def script(self, nonce: str, predecessor: str) -> tuple[str, SbatchJob]:
        """The successor's script and name: this job's, with a new nonce and predecessor."""
        plan = self.job.plan.model_copy(
            update={"nonce": nonce, "predecessor": predecessor, "job_id": None}
        )
        text, sbatch_job = render(
            plan.spec, plan, self.job.site, log_dir=self.job.log_dir, python=self.job.python
        )
        return text, sbatch_job

    def submit(self, nonce: str, predecessor: str) -> str:
        """sbatch the successor and write its ``pending`` record (unless it already runs)."""
        text, sbatch_job = self.script(nonce, predecessor)
        with _answered():
            job_id = self.client.sbatch(text)
        plan = self.job.plan
        Registry(plan.registry_dir).create(
            pending_record(
                "slurm",
                job_id,
                nonce,
                model=plan.spec.name,
                engine=plan.spec.engine,
                log_path=sbatch_job.log_path(job_id),
                started_by=f"handover from job {predecessor}",
                predecessor=predecessor,
            )
        )
        return job_id

    def cancel(self, job_id: str) -> None:
        """scancel a successor nobody will use."""
        with _answered():
            self.client.scancel(job_id)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m hpc.slurm.handover``."""
    parser = argparse.ArgumentParser(prog="python -m hpc.slurm.handover", description=__doc__)
    parser.add_argument("--plan", required=True, help="the handover job JSON, - for stdin")
    args = parser.parse_args(argv)
    raw = sys.stdin.read() if args.plan == "-" else Path(args.plan).read_text(encoding="utf-8")
    job = HandoverJob.model_validate_json(raw)
    client = SlurmClient(
        LocalTransport(submit_environ(os.environ)), timeout_s=job.site.command_timeout_s
    )
    successors = SlurmSuccessors(job, client)
    return JobWrapper(job.plan, os.environ, sys.stdout, successors=successors).run()


if __name__ == "__main__":
    sys.exit(main())
