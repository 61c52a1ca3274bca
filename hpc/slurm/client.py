"""The Slurm client: every Slurm command goes through ``SlurmClient.run``.

Only machine-readable output is parsed (``sbatch --parsable``, ``squeue --json``, or
``squeue --format`` with a separator on a Slurm too old for ``--json``); a non-zero exit is
failure, stderr alone is not; a timeout is "unknown", never "failed". ``sacct`` is asked
only when the cluster has accounting (it fails with "accounting storage is disabled"
otherwise), and only for jobs ``squeue`` no longer shows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from hpc.errors import SlurmError
from hpc.transport import CommandResult, CommandTimeout, Transport

# sbatch's rejections, matched on its stderr, with what to run to see what is allowed.
_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"invalid partition", re.I), "`sinfo -s` lists the partitions you can use"),
    (
        re.compile(r"invalid account|account/partition", re.I),
        "`sacctmgr show assoc user=$USER format=account,partition,qos` shows your accounts",
    ),
    (
        re.compile(r"invalid qos", re.I),
        "`sacctmgr show assoc user=$USER format=qos` lists your QOS",
    ),
    (
        re.compile(r"invalid generic resource|gres", re.I),
        "`sinfo -o '%P %G'` shows the GPUs (gres) of each partition; check resources.gpu_type",
    ),
    (
        re.compile(r"node configuration is not available", re.I),
        "no node has all you asked for: `sinfo -o '%P %c %m %G'` shows CPUs, memory (MB) and GPUs",
    ),
    (re.compile(r"time limit", re.I), "`sinfo -o '%P %l'` shows each partition's time limit"),
)

# Slurm job states, grouped as ModelTainer sees them.
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
RUNNING_STATES = frozenset(
    {
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "SIGNALING",
        "STAGE_OUT",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
    }
)
DONE_STATES = frozenset({"COMPLETED"})
CANCELLED_STATES = frozenset({"CANCELLED", "PREEMPTED", "DEADLINE", "TIMEOUT"})


@dataclass(frozen=True)
class SlurmJob:
    """One job as squeue (or sacct) reports it."""

    job_id: str
    state: str  # Slurm's own word: PENDING, RUNNING, …
    reason: str  # why it is pending ("Priority", "Resources", …) or "None"
    name: str
    comment: str
    nodes: str


# What Slurm's tools print when they lost touch with the controller mid-RPC: the request
# may have been carried out (sbatch: the job may be queued), so the answer is "unknown".
TRANSPORT_ERRORS = (
    "Socket timed out on send/recv operation",
    "Unable to contact slurm controller",
    "Zero Bytes were transmitted or received",
    "Transport endpoint is not connected",
    "Communication connection failure",
)
_MESSAGE_TIMEOUT = re.compile(r"^MessageTimeout\s*=\s*(\d+)", re.MULTILINE)


def is_transport_error(stderr: str) -> bool:
    """True if ``stderr`` says the controller was not (or no longer) reachable."""
    return any(text in stderr for text in TRANSPORT_ERRORS)


def hint_for(stderr: str) -> str | None:
    """A hint for a known Slurm error message, or None."""
    return next((hint for pattern, hint in _HINTS if pattern.search(stderr)), None)


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


class SlurmAPI(Protocol):
    """What the Slurm backend needs from Slurm: the CLI client, or the pyslurm adapter."""

    def sbatch(self, script: str) -> str:
        """Submit a batch script; returns the job id."""
        ...

    def scancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """Cancel a job, or only send it ``signal`` (to the batch shell with ``batch_only``)."""
        ...

    def jobs(self, job_ids: Iterable[str] | None = None) -> dict[str, SlurmJob]:
        """The jobs the controller still knows, keyed by id (all of them, or ``job_ids``)."""
        ...

    def find_by_comment(self, comment: str) -> SlurmJob | None:
        """The job whose comment is ``comment``, if any."""
        ...

    def accounting(self, job_ids: Sequence[str]) -> dict[str, SlurmJob] | None:
        """Final states from accounting; None where the cluster keeps none."""
        ...

    def message_timeout_s(self) -> float | None:
        """The controller's ``MessageTimeout`` (how long one RPC may take), if known."""
        ...


class SlurmClient:
    """Slurm's command-line tools, run through a transport (local or SSH)."""

    def __init__(self, transport: Transport, *, timeout_s: float = 60.0) -> None:
        self.transport = transport
        self.timeout_s = timeout_s
        self._json: bool | None = None  # does this squeue speak --json? learnt on first use
        self._has_accounting: bool | None = None  # learnt from the first sacct call
        self._message_timeout_s: float | None = None  # learnt from scontrol show config

    def run(
        self, argv: list[str], *, stdin: str | None = None, check: bool = True
    ) -> CommandResult:
        """Run one Slurm command; non-zero exit: SlurmError with a hint; timeout: CommandTimeout."""
        try:
            result = self.transport.run(argv, stdin=stdin, timeout_s=self.timeout_s)
        except FileNotFoundError as exc:
            raise SlurmError(
                f"{argv[0]} is not installed here",
                argv=argv,
                hint="run mt on a Slurm login node, or use `mt --host <login-node>` from a laptop",
            ) from exc
        if check and result.returncode != 0:
            message = _first_line(result.stderr) or f"exit code {result.returncode}"
            raise SlurmError(
                f"{argv[0]} failed: {message}",
                argv=argv,
                returncode=result.returncode,
                stderr=result.stderr,
                hint=hint_for(result.stderr),
            )
        return result

    def sbatch(self, script: str) -> str:
        """Submit ``script`` (on stdin); returns the job id."""
        result = self.run(["sbatch", "--parsable"], stdin=script)
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = result.stdout.strip().split(";", 1)[0]
        if not job_id.isdigit():
            raise SlurmError(
                f"sbatch printed no job id: {result.stdout.strip()!r}",
                argv=result.argv,
                stderr=result.stderr,
            )
        return job_id

    def scancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """Cancel (or, with ``signal``, only signal) a job."""
        argv = ["scancel"]
        if signal:
            argv.append(f"--signal={signal}")
        if batch_only:
            argv.append("--batch")
        self.run([*argv, job_id])

    def jobs(self, job_ids: Iterable[str] | None = None) -> dict[str, SlurmJob]:
        """Jobs squeue knows, keyed by id, in one call; only ``job_ids`` if given.

        A job squeue no longer shows has ended (and been purged after MinJobAge): it is
        simply absent from the answer.
        """
        wanted = set(job_ids) if job_ids is not None else None
        if wanted is not None and not wanted:
            return {}
        if self._json is not False:
            result = self.run(["squeue", "--json"], check=False)
            if result.returncode == 0:
                self._json = True
                found = parse_squeue_json(result)
                return {k: v for k, v in found.items() if wanted is None or k in wanted}
            if "json" not in result.stderr.lower() and "unrecognized" not in result.stderr.lower():
                self.run(["squeue", "--json"])  # raise the real error
            self._json = False
        result = self.run(["squeue", "--noheader", "--states=all", f"--format={_FORMAT}"])
        found = _parse_squeue_format(result.stdout)
        return {k: v for k, v in found.items() if wanted is None or k in wanted}

    def find_by_comment(self, comment: str) -> SlurmJob | None:
        """The job whose comment is ``comment`` (``mt:<nonce>``), if squeue shows one."""
        return next((job for job in self.jobs().values() if job.comment == comment), None)

    def message_timeout_s(self) -> float | None:
        """``MessageTimeout`` from ``scontrol show config`` (asked once); None if unknown."""
        if self._message_timeout_s is None:
            try:
                text = self.run(["scontrol", "show", "config"], check=False).stdout
            except (SlurmError, CommandTimeout):
                return None
            found = _MESSAGE_TIMEOUT.search(text)
            self._message_timeout_s = float(found.group(1)) if found else 0.0
        return self._message_timeout_s or None

    def accounting(self, job_ids: Sequence[str]) -> dict[str, SlurmJob] | None:
        """Final states from sacct, or None when the cluster has no accounting storage."""
        if not job_ids:
            return {}
        if self._has_accounting is False:
            return None
        try:
            result = self.run(
                [
                    "sacct",
                    "--parsable2",
                    "--noheader",
                    "--allocations",
                    "--format=JobID,State,Reason,JobName,NodeList",
                    f"--jobs={','.join(job_ids)}",
                ],
                check=False,
            )
        except CommandTimeout:
            return None
        if result.returncode != 0:
            if "accounting storage is disabled" in result.stderr:
                self._has_accounting = False  # never ask again
            return None
        out: dict[str, SlurmJob] = {}
        for line in result.stdout.splitlines():
            parts = line.split("|")
            if len(parts) >= 5:
                state = parts[1].split()[0] if parts[1] else "UNKNOWN"
                out[parts[0]] = SlurmJob(parts[0], state, parts[2], parts[3], "", parts[4])
        return out


_FORMAT = "%i|%T|%r|%j|%k|%N"


def _parse_squeue_format(text: str) -> dict[str, SlurmJob]:
    out: dict[str, SlurmJob] = {}
    for line in text.splitlines():
        parts = line.split("|", 5)
        if len(parts) == 6:
            job_id, state, reason, name, comment, nodes = (p.strip() for p in parts)
            out[job_id] = SlurmJob(job_id, state, reason, name, comment, nodes)
    return out


def _state_word(value: object) -> str:
    # 22.05 gives "job_state": "PENDING"; newer releases give a list such as ["PENDING"].
    if isinstance(value, list):
        return str(value[0]) if value else "UNKNOWN"
    return str(value or "UNKNOWN")


def parse_squeue_json(result: CommandResult) -> dict[str, SlurmJob]:
    """The jobs in ``squeue --json``'s output; SlurmError for the failure it reports."""
    data = json.loads(result.stdout)
    # Slurm 22.05's squeue --json exits 0 when it cannot reach the controller, with an empty
    # job list and the failure under "errors": read as it is, every job would look ended.
    errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
    if errors:
        said = "; ".join(
            ": ".join(str(e[k]) for k in ("source", "error", "description") if e.get(k))
            for e in errors
        )
        raise SlurmError(
            f"squeue failed: {said or 'an error without a message'}",
            argv=result.argv,
            returncode=result.returncode,
            stderr=result.stderr,
            hint=hint_for(result.stderr)
            or "the Slurm controller did not answer: `scontrol ping` says whether it is up",
        )
    out: dict[str, SlurmJob] = {}
    for job in data.get("jobs", []):
        job_id = str(job.get("job_id"))
        out[job_id] = SlurmJob(
            job_id=job_id,
            state=_state_word(job.get("job_state")),
            reason=str(job.get("state_reason") or "None"),
            name=str(job.get("name") or ""),
            comment=str(job.get("comment") or ""),
            nodes=str(job.get("nodes") or job.get("batch_host") or ""),
        )
    return out
