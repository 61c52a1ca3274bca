"""pyslurm.JobSubmitDescription: a job's attributes, submitted as one batch job.

The attributes are the public ones of the real class (submission.pxd); setting any other name
fails with AttributeError, as on the Cython class. ``submit()`` makes the checks pyslurm makes
(``_validate_options``, ``_set_defaults``, ``_validate_batch_script``, the conversions of
times, memory, nodes, signals and GRES) and then sends what slurm_submit_batch_job would send
through ``sbatch --parsable`` with the equivalent options. libslurm never reads ``#SBATCH``
lines, so they are hidden from sbatch (``#SBATCH`` becomes ``# SBATCH``, still a comment).
"""

from __future__ import annotations

import re
from os import getcwd
from pathlib import Path
from typing import Any

from pyslurm import _rpc
from pyslurm.core.job.job import signal_to_num

ATTRIBUTES: tuple[str, ...] = (
    "name", "account", "user_id", "group_id", "priority", "site_factor", "wckey", "array",
    "batch_constraints", "begin_time", "clusters", "cluster_constraints", "comment",
    "admin_comment", "requires_contiguous_nodes", "cores_reserved_for_system",
    "threads_reserved_for_system", "working_directory", "cpu_frequency", "nodes", "deadline",
    "delay_boot_time", "dependencies", "excluded_nodes", "required_nodes", "constraints",
    "kill_on_node_fail", "licenses", "mail_user", "mail_types", "mcs_label", "memory_per_cpu",
    "memory_per_node", "memory_per_gpu", "network", "nice", "log_files_open_mode", "overcommit",
    "partitions", "profile_types", "accounting_gather_frequency", "qos",
    "requires_node_reboot", "is_requeueable", "reservations", "script", "script_args",
    "environment", "resource_sharing", "distribution", "time_limit", "time_limit_min",
    "container", "cpus_per_task", "cpus_per_gpu", "sockets_per_node", "cores_per_socket",
    "threads_per_core", "gpus", "gpus_per_socket", "gpus_per_task", "gres_per_node",
    "gpu_binding", "ntasks", "ntasks_per_node", "ntasks_per_socket", "ntasks_per_core",
    "ntasks_per_gpu", "switches", "signal", "standard_in", "standard_output", "standard_error",
    "kill_on_invalid_dependency", "spreads_over_nodes", "use_min_nodes", "gres_binding",
    "gres_tasks_per_sharing", "temporary_disk_per_node", "get_user_environment",
    "min_cpus_per_node", "wait_all_nodes",
)  # fmt: skip

# Attributes pyslurm copies as strings (lists joined with ","), with sbatch's option for each.
_STRINGS: dict[str, str] = {
    "account": "--account",
    "begin_time": "--begin",
    "comment": "--comment",
    "constraints": "--constraint",
    "dependencies": "--dependency",
    "environment": "--export",
    "excluded_nodes": "--exclude",
    "licenses": "--licenses",
    "mail_types": "--mail-type",
    "mail_user": "--mail-user",
    "name": "--job-name",
    "partitions": "--partition",
    "qos": "--qos",
    "required_nodes": "--nodelist",
    "reservations": "--reservation",
    "standard_error": "--error",
    "standard_in": "--input",
    "standard_output": "--output",
    "wckey": "--wckey",
    "working_directory": "--chdir",
}
_COUNTS: dict[str, str] = {
    "cpus_per_gpu": "--cpus-per-gpu",
    "cpus_per_task": "--cpus-per-task",
    "ntasks": "--ntasks",
    "ntasks_per_node": "--ntasks-per-node",
}
_MEMORY: dict[str, str] = {"memory_per_node": "--mem", "memory_per_cpu": "--mem-per-cpu"}
_TIMES: dict[str, str] = {"time_limit": "--time", "time_limit_min": "--time-min"}
_SHARING: dict[str, str] = {
    "no": "--exclusive",
    "exclusive": "--exclusive",
    "yes": "--oversubscribe",
    "oversubscribe": "--oversubscribe",
    "user": "--exclusive=user",
    "mcs": "--exclusive=mcs",
}
_HANDLED = frozenset(
    {*_STRINGS, *_COUNTS, *_MEMORY, *_TIMES}
    | {"script", "nodes", "priority", "is_requeueable", "resource_sharing", "signal"}
    | {"gres_per_node", "gpus", "log_files_open_mode", "overcommit", "requires_contiguous_nodes"}
)
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


class JobSubmitDescription:
    """Submit description for a batch job; attributes as in sbatch, named as in pyslurm."""

    __slots__ = ATTRIBUTES

    def __init__(self, **kwargs: Any) -> None:
        for attr in ATTRIBUTES:
            object.__setattr__(self, attr, None)
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return "pyslurm.JobSubmitDescription"

    def submit(self) -> int:
        """Submit the batch job; its id. RPCError: slurmctld refused it; ValueError: pyslurm."""
        self._validate_options()
        self._set_defaults()
        options = self._sbatch_options()
        script = _validate_batch_script(self.script, self.script_args)
        hidden = re.sub(r"(?m)^#SBATCH", "# SBATCH", script)
        out = _rpc.run(["sbatch", "--parsable", *options], stdin=hidden)
        return int(out.strip().split(";", 1)[0])

    def _validate_options(self) -> None:
        if not self.script:
            raise ValueError("You need to provide a batch script.")
        memory = [self.memory_per_node, self.memory_per_cpu, self.memory_per_gpu]
        if sum(1 for m in memory if m) > 1:
            raise ValueError(
                "Only one of memory_per_cpu, memory_per_node or memory_per_gpu can be set."
            )
        if self.cpus_per_gpu and self.cpus_per_task:
            raise ValueError("cpus_per_task and cpus_per_gpu are mutually exclusive.")

    def _set_defaults(self) -> None:
        if not self.ntasks:
            self.ntasks = 1
        if not self.cpus_per_task:
            self.cpus_per_task = 1
        if not self.working_directory:
            self.working_directory = str(getcwd())
        if not self.environment:
            self.environment = "ALL"  # sbatch's default too

    def _sbatch_options(self) -> list[str]:
        unknown = [a for a in ATTRIBUTES if a not in _HANDLED and getattr(self, a) is not None]
        if unknown:
            raise NotImplementedError(f"the fake pyslurm does not model {', '.join(unknown)}")
        if not isinstance(self.environment, str):
            raise NotImplementedError("the fake pyslurm models environment only as a string")
        opts: list[str] = []
        for attr, flag in _STRINGS.items():
            value = getattr(self, attr)
            if value:
                opts.append(f"{flag}={value if isinstance(value, str) else ','.join(value)}")
        for attr, flag in _COUNTS.items():
            value = getattr(self, attr)
            if value:
                opts.append(f"{flag}={int(value)}")
        for attr, flag in _MEMORY.items():
            if getattr(self, attr):
                opts.append(f"{flag}={_dehumanize(getattr(self, attr))}")
        for attr, flag in _TIMES.items():
            minutes = _timestr_to_mins(getattr(self, attr))
            if minutes is not None:
                opts.append(f"{flag}={minutes}")
        low, high = _parse_nodes(self.nodes)
        opts.append(f"--nodes={low}" if low == high else f"--nodes={low}-{high}")
        if self.priority is not None:
            opts.append("--hold" if int(self.priority) == 0 else f"--priority={int(self.priority)}")
        if self.is_requeueable is not None:
            opts.append("--requeue" if self.is_requeueable else "--no-requeue")
        if self.overcommit:
            opts.append("--overcommit")
        if self.requires_contiguous_nodes:
            opts.append("--contiguous")
        if self.resource_sharing:
            opts.append(_SHARING[str(self.resource_sharing).casefold()])
        if self.log_files_open_mode in ("append", "truncate"):  # pyslurm ignores anything else
            opts.append(f"--open-mode={self.log_files_open_mode}")
        if self.signal:
            opts.append(f"--signal={_signal_option(self.signal)}")
        if self.gres_per_node:
            opts.append(f"--gres={_gres(self.gres_per_node, '')}")
        if self.gpus:
            opts.append(f"--gpus={_gres(self.gpus, 'gpu').removeprefix('gpu:')}")
        return opts


def _validate_batch_script(script: str, args: Any = None) -> str:
    """pyslurm's check: a path to a script is read; otherwise ``script`` is the text itself."""
    if Path(script).is_file():
        script = Path(script).read_text()
    elif args:
        raise ValueError(
            "Passing arguments to a script is only allowed if it was loaded from a file."
        )
    if not script:
        raise ValueError("Batch script is empty or none was provided.")
    if script.isspace():
        raise ValueError("Batch script contains only whitespace.")
    if not script.startswith("#!"):
        raise ValueError(
            "Not a valid Batch script. First line must start with '#!',"
            "followed by the path to an interpreter"
        )
    if "\0" in script:
        raise ValueError(
            "The Slurm Controller does not allow scripts that contain a NULL character: '\\0'."
        )
    if "\r\n" in script:
        raise ValueError(
            "Batch script contains DOS line breaks (\\r\\n) instead of expected UNIX line "
            "breaks (\\n)."
        )
    return script


def _timestr_to_mins(value: Any) -> int | str | None:
    """pyslurm.utils.ctime.timestr_to_mins, then the assignment to job_desc's uint32_t."""
    if value is None:
        return None
    if str(value).isdigit():
        if isinstance(value, str):
            # timestr_to_mins returns a digit string unchanged; Cython cannot store it in C.
            raise TypeError("an integer is required")
        return int(value)
    if str(value).casefold() == "unlimited":
        return "UNLIMITED"
    return str(value)  # slurm_time_str2mins reads it as sbatch does


def _dehumanize(value: Any) -> int:
    """pyslurm.utils.helpers.dehumanize: mebibytes, from "512M", "4G" or a plain number."""
    parts = re.split(f"([{''.join(_UNITS)}])", str(value))
    if len(parts) == 1:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"Invalid value specified: {value}") from None
    return round(float(parts[0]) * _UNITS[parts[1]] / _UNITS["M"])


def _parse_nodes(value: Any) -> tuple[int, int]:
    """pyslurm's _parse_nodes: sbatch's "min[-max]", an int, or {"min": .., "max": ..}."""
    if value is None:
        return 1, 1
    if isinstance(value, dict):
        low = int(value.get("min", 1))
        return low, int(value.get("max", low))
    low_text, _, high_text = str(value).partition("-")
    low = int(low_text) or 1
    high = int(high_text) if high_text else low
    if high < low:
        raise ValueError("Max Nodecount cannot be less than minimum nodecount.")
    return low, high


def _signal_option(value: Any) -> str:
    """pyslurm's _set_signal (from a dict, or sbatch's string), as sbatch's --signal."""
    if not isinstance(value, dict):
        parts = re.split("[:@]+", str(value))
        info: dict[str, Any] = {}
        if ":" in str(value):
            flags = parts.pop(0).casefold()
            info["allow_reservation_overlap"] = "r" in flags
            info["batch_only"] = "b" in flags
        info["signal"] = parts[0]
        if "@" in str(value):
            info["time"] = parts[1]
        value = info
    number = signal_to_num(value.get("signal"))
    seconds = int(value["time"]) if value.get("time") is not None else 60
    flags = ("R" if value.get("allow_reservation_overlap") else "") + (
        "B" if value.get("batch_only") else ""
    )
    return f"{flags}:{number}@{seconds}" if flags else f"{number}@{seconds}"


def _gres(value: Any, typ: str) -> str:
    """pyslurm's cstr.from_gres_dict, without the ``gres:`` prefix sbatch adds itself."""
    if isinstance(value, str) and not value.isdigit():
        counts: dict[str, int] = {}
        for item in value.replace("gres:", "").split(","):
            name, count = item.rsplit(":", 1)
            counts[name] = int(count)
    elif not isinstance(value, dict):
        return f"{typ}:{int(value)}"
    else:
        counts = {str(k): int(v) for k, v in value.items()}
    out = []
    for name, count in counts.items():
        if len(name.split(":")) > 2:
            raise ValueError(f"Invalid specifier: '{name}'")
        out.append(f"{name if typ in name else f'{typ}:{name}'}:{count}")
    return ",".join(out)
