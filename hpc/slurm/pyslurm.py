"""The pyslurm adapter: ``SlurmAPI`` through libslurm (pyslurm 25.11) instead of the CLI tools.

Opt-in (``slurm.use_pyslurm: true`` in site.yaml) and used only when ``import pyslurm`` works
and pyslurm was built for the cluster's Slurm: pyslurm X.Y.z is for Slurm X.Y only (its first
two numbers are Slurm's release, written without the zero: pyslurm 25.5.0 is for Slurm 25.05).
In every other case the backend keeps the CLI client, which works everywhere. pyslurm talks to
the slurmctld from this process, so it only serves mt running on a login node, never over SSH.

Where libslurm differs from the CLI, this module does what sbatch and scancel would do:

* libslurm does not read a script's ``#SBATCH`` lines (sbatch does). They are read here, with
  shell quoting as sbatch reads them, and passed as ``JobSubmitDescription`` attributes; an
  option this module does not know fails rather than being dropped. pyslurm's own
  ``load_sbatch_options`` is not used: it wants a file path, keeps quotes in values and cuts a
  value at ``#``.
* pyslurm sets ntasks to 1 unless told; sbatch derives it from nodes x ntasks-per-node.
* A plain number of minutes is passed as an int (pyslurm hands a digit string to a C integer),
  and signals by their Python names (``SIGUSR1``: pyslurm looks them up in ``signal.Signals``).

pyslurm's ``RPCError`` becomes ``SlurmError`` here, with the CLI client's hints; a socket
timeout becomes ``CommandTimeout``, since the controller may or may not have acted. One
difference stays: cancelling a job the controller has already forgotten succeeds (pyslurm
ignores "Invalid job id" for SIGKILL), where ``scancel`` fails.
"""

from __future__ import annotations

import re
import shlex
import signal as signals
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from hpc.errors import SlurmError
from hpc.slurm.client import SlurmClient, SlurmJob, hint_for
from hpc.transport import CommandTimeout

# libslurm's SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT, "Socket timed out on send/recv operation".
SOCKET_TIMEOUT_ERRNO = 5004

# sbatch's long options, as JobSubmitDescription attributes that take sbatch's spelling.
_VALUE_OPTIONS: dict[str, str] = {
    "--account": "account",
    "--begin": "begin_time",
    "--chdir": "working_directory",
    "--comment": "comment",
    "--constraint": "constraints",
    "--dependency": "dependencies",
    "--error": "standard_error",
    "--exclude": "excluded_nodes",
    "--export": "environment",
    "--gpus": "gpus",
    "--gres": "gres_per_node",
    "--job-name": "name",
    "--licenses": "licenses",
    "--mail-type": "mail_types",
    "--mail-user": "mail_user",
    "--mem": "memory_per_node",
    "--mem-per-cpu": "memory_per_cpu",
    "--mem-per-gpu": "memory_per_gpu",
    "--nodelist": "required_nodes",
    "--nodes": "nodes",
    "--open-mode": "log_files_open_mode",
    "--output": "standard_output",
    "--partition": "partitions",
    "--qos": "qos",
    "--reservation": "reservations",
    "--wckey": "wckey",
}
_INT_OPTIONS: dict[str, str] = {
    "--cpus-per-gpu": "cpus_per_gpu",
    "--cpus-per-task": "cpus_per_task",
    "--ntasks": "ntasks",
    "--ntasks-per-node": "ntasks_per_node",
}
# Options without a value, and the attribute value each stands for.
_SWITCHES: dict[str, tuple[str, object]] = {
    "--contiguous": ("requires_contiguous_nodes", True),
    "--exclusive": ("resource_sharing", "no"),
    "--hold": ("priority", 0),
    "--no-requeue": ("is_requeueable", False),
    "--overcommit": ("overcommit", True),
    "--requeue": ("is_requeueable", True),
}
_TIME_OPTIONS: dict[str, str] = {"--time": "time_limit", "--time-min": "time_limit_min"}
_SPECIAL_OPTIONS = frozenset({"--signal", "--gpus-per-node"})


def sbatch_options(script: str) -> list[tuple[str, str | None]]:
    """The script's ``#SBATCH`` options as sbatch reads them: up to its first command line."""
    options: list[tuple[str, str | None]] = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.lstrip().startswith("#"):
                break  # sbatch stops at the first line that is neither blank nor a comment
            continue
        try:
            tokens = shlex.split(line[len("#SBATCH") :], comments=True)
        except ValueError as exc:
            raise SlurmError(f"cannot read {line!r}: {exc}", argv=["pyslurm"]) from exc
        while tokens:
            token = tokens.pop(0)
            if not token.startswith("--"):
                raise _unsupported(token)
            flag, eq, value = token.partition("=")
            if eq:
                options.append((flag, value))
            elif flag in _SWITCHES or not tokens or tokens[0].startswith("-"):
                options.append((flag, None))
            else:
                options.append((flag, tokens.pop(0)))  # "--time 30", as sbatch allows
    return options


def submit_description(script: str) -> dict[str, Any]:
    """Keyword arguments for ``pyslurm.JobSubmitDescription``: the script and its options."""
    desc: dict[str, Any] = {"script": script}
    for flag, value in sbatch_options(script):
        if flag in _SWITCHES:
            attr, switched = _SWITCHES[flag]
            # --exclusive=user|mcs share with such jobs only; bare --exclusive shares nothing
            desc[attr] = value if flag == "--exclusive" and value else switched
            continue
        if value is None:
            raise SlurmError(f"#SBATCH {flag} needs a value", argv=["pyslurm"])
        if flag in _VALUE_OPTIONS:
            desc[_VALUE_OPTIONS[flag]] = value
        elif flag in _INT_OPTIONS:
            desc[_INT_OPTIONS[flag]] = _integer(flag, value)
        elif flag in _TIME_OPTIONS:
            desc[_TIME_OPTIONS[flag]] = int(value) if value.isdigit() else value
        elif flag == "--signal":
            desc["signal"] = _warn_signal(value)
        elif flag == "--gpus-per-node":
            # JobSubmitDescription has no gpus_per_node: pyslurm's docs say to use gres_per_node.
            desc["gres_per_node"] = f"gpu:{value}"
        else:
            raise _unsupported(flag)
    if "ntasks" not in desc and "ntasks_per_node" in desc:
        min_nodes = str(desc.get("nodes", "1")).split("-", 1)[0]
        desc["ntasks"] = _integer("--nodes", min_nodes) * desc["ntasks_per_node"]
    return desc


def signal_name(value: str) -> str | int:
    """``USR1``, ``SIGUSR1`` or ``10`` as pyslurm takes a signal: ``SIGUSR1``, or the number."""
    if value.isdigit():
        return int(value)
    name = value.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name not in signals.Signals.__members__:
        raise SlurmError(f"unknown signal {value!r}", argv=["pyslurm"], hint="`kill -l` lists them")
    return name


def _warn_signal(value: str) -> dict[str, Any]:
    """sbatch's ``--signal=[{R}{B}:]<sig>[@<seconds>]`` as JobSubmitDescription's dict."""
    flags, _, rest = value.rpartition(":")
    sig, _, seconds = rest.partition("@")
    if set(flags.upper()) - {"R", "B"}:
        raise SlurmError(f"cannot read --signal={value}", argv=["pyslurm"])
    return {
        "signal": signal_name(sig),
        "time": _integer("--signal", seconds) if seconds else 60,  # sbatch's default
        "batch_only": "B" in flags.upper(),
        "allow_reservation_overlap": "R" in flags.upper(),
    }


def _integer(flag: str, value: str) -> int:
    if not value.isdigit():
        raise SlurmError(f"#SBATCH {flag}={value}: a whole number is needed", argv=["pyslurm"])
    return int(value)


def _unsupported(option: str) -> SlurmError:
    return SlurmError(
        f"#SBATCH {option} cannot be passed through pyslurm",
        argv=["pyslurm"],
        hint="use a long option mt knows, or set slurm.use_pyslurm: false in site.yaml",
    )


class PyslurmAPI:
    """``SlurmAPI`` through pyslurm: libslurm's RPCs in this process instead of Slurm's tools."""

    def __init__(self, pyslurm: ModuleType, *, message_timeout_s: float = 10.0) -> None:
        self.pyslurm = pyslurm
        # libslurm waits MessageTimeout (slurm.conf) per RPC: the CommandTimeout's number.
        self._message_timeout_s = message_timeout_s

    @contextmanager
    def _rpc(self, call: str) -> Iterator[None]:
        """Translate pyslurm's RPCError, at this one boundary, as the CLI client reports."""
        argv = [f"pyslurm.{call}"]
        try:
            yield
        except self.pyslurm.RPCError as exc:
            if getattr(exc, "errno", None) == SOCKET_TIMEOUT_ERRNO:
                raise CommandTimeout(argv, self._message_timeout_s) from exc
            message = str(exc) or f"errno {getattr(exc, 'errno', '?')}"
            raise SlurmError(
                f"{argv[0]} failed: {message}", argv=argv, stderr=message, hint=hint_for(message)
            ) from exc

    def message_timeout_s(self) -> float | None:
        """The ``MessageTimeout`` this adapter was made with."""
        return self._message_timeout_s

    def sbatch(self, script: str) -> str:
        """Submit ``script`` with its ``#SBATCH`` options given explicitly; returns the job id."""
        desc = self.pyslurm.JobSubmitDescription(**submit_description(script))
        with self._rpc("JobSubmitDescription.submit"):
            try:
                job_id = desc.submit()
            except ValueError as exc:  # pyslurm's own checks: the script, times, memory
                raise SlurmError(
                    f"pyslurm rejected the job: {exc}", argv=["pyslurm.JobSubmitDescription"]
                ) from exc
        return str(job_id)

    def scancel(self, job_id: str, *, signal: str | None = None, batch_only: bool = False) -> None:
        """Cancel a job, or send it ``signal``: to its steps, or only its batch shell."""
        if not job_id.isdigit():
            raise SlurmError(f"not a job id: {job_id!r}", argv=["pyslurm.Job"])
        job = self.pyslurm.Job(int(job_id))
        if signal is None and not batch_only:
            with self._rpc("Job.cancel"):
                job.cancel()
            return
        # scancel's default signal is SIGKILL; without --batch it spares the batch shell
        sig = signal_name(signal or "KILL")
        with self._rpc("Job.send_signal"):
            job.send_signal(sig, steps="batch" if batch_only else "children")

    def jobs(self, job_ids: Iterable[str] | None = None) -> dict[str, SlurmJob]:
        """Jobs the controller knows, keyed by id, from one load; only ``job_ids`` if given."""
        wanted = set(job_ids) if job_ids is not None else None
        if wanted is not None and not wanted:
            return {}
        with self._rpc("Jobs.load"):
            loaded = self.pyslurm.Jobs.load()
        out: dict[str, SlurmJob] = {}
        for job in loaded.values():
            job_id = str(job.id)
            if wanted is None or job_id in wanted:
                out[job_id] = SlurmJob(
                    job_id=job_id,
                    state=job.state or "UNKNOWN",
                    reason=job.state_reason or "None",
                    name=job.name or "",
                    comment=job.comment or "",
                    nodes=job.allocated_nodes or job.batch_host or "",
                )
        return out

    def find_by_comment(self, comment: str) -> SlurmJob | None:
        """The job whose comment is ``comment`` (``mt:<nonce>``), if the controller has one."""
        return next((job for job in self.jobs().values() if job.comment == comment), None)

    def accounting(self, job_ids: Sequence[str]) -> dict[str, SlurmJob] | None:
        """Final states from slurmdbd, or None when there is none (or it did not answer)."""
        if not job_ids:
            return {}
        db = self.pyslurm.db
        try:
            found = db.Jobs.load(db.JobFilter(ids=[int(i) for i in job_ids]))
        except self.pyslurm.RPCError:
            return None  # accounting_storage/none: no slurmdbd connection to open
        return {
            str(job.id): SlurmJob(
                str(job.id),
                job.state or "UNKNOWN",
                job.state_reason or "None",
                job.name or "",
                "",  # pyslurm.db.Job.comment is the derived exit string, not the job's comment
                job.nodelist or "",
            )
            for job in found.values()
        }


def _major_minor(version: str) -> tuple[int, int] | None:
    found = re.search(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def pyslurm_api_if_usable(cluster_version: str) -> PyslurmAPI | None:
    """A PyslurmAPI if pyslurm imports and is built for ``cluster_version``'s major.minor.

    ``cluster_version`` is what ``sinfo --version`` prints ("slurm 25.11.2"); pyslurm writes
    its version without leading zeros ("25.5.0" for 25.05), so the numbers are compared.
    """
    wanted = _major_minor(cluster_version)
    if wanted is None:
        return None
    try:
        import pyslurm
    except ImportError:
        return None
    if _major_minor(str(getattr(pyslurm, "__version__", ""))) != wanted:
        return None
    return PyslurmAPI(pyslurm)


def pyslurm_api_for(client: SlurmClient) -> PyslurmAPI | None:
    """The adapter for the cluster ``client`` reaches, if usable (asks ``sinfo --version``)."""
    try:
        version = client.run(["sinfo", "--version"]).stdout
    except (SlurmError, CommandTimeout):
        return None  # the CLI client will report what is wrong on its first real command
    return pyslurm_api_if_usable(version)
