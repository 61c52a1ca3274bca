"""`mt doctor`'s checks of the machine mt runs on, and the report line every check makes.

``local_checks`` looks at this machine: the Slurm commands and whether ``squeue --json``
answers (through ``SlurmClient``, like every Slurm command), whether sbatch takes the
``--signal=B:USR1@N`` every job asks for (``sbatch --test-only``: nothing is queued),
accounting, Apptainer, the
registry directory, whether the private files are private (``hpc.permissions``: reported
here, refused by every other command), the Python that jobs will run, and which llama.cpp
server ``engine: llamacpp`` runs outside a container (``hpc.llamacppserver``). What the probe
job saw on a compute node becomes checks in ``hpc.doctor.probe``; ``hpc.doctor.diagnosis``
runs both.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc import __version__
from hpc.errors import EngineError, SlurmError
from hpc.llamacppserver import BUILD_HINT, host_server
from hpc.permissions import exposure, fixes
from hpc.site import Site
from hpc.slurm.client import (
    PENDING_STATES,
    RUNNING_STATES,
    SlurmClient,
    hint_for,
    parse_squeue_json,
)
from hpc.transport import CommandTimeout, LocalTransport

APPTAINER_HINT = (
    "ask your admin, or `module load apptainer` (list it in site.yaml slurm.modules); "
    "only models with runtime: apptainer need it"
)


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report: ``ok`` is None where the check does not apply."""

    name: str
    ok: bool | None
    detail: str
    hint: str | None = None


# ---------------------------------------------------------------- on the machine mt runs on

SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "srun")


def local_checks(
    site: Site,
    *,
    client: SlurmClient | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[Check]:
    """Checks on this machine; ``environ`` (default os.environ) gives PATH and the Slurm env."""
    env = dict(os.environ if environ is None else environ)
    path = env.get("PATH", "")
    transport = LocalTransport(env)
    timeout_s = site.config.slurm.command_timeout_s
    slurm = client or SlurmClient(transport, timeout_s=timeout_s)
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd, path=path) is None]
    checks = [_slurm_commands_check(missing)]
    if "squeue" in missing:
        checks.append(Check("squeue --json", None, "skipped: squeue is not installed here"))
    else:
        checks.append(_squeue_check(slurm))
    if "sbatch" in missing:
        checks.append(Check("sbatch --signal", None, "skipped: sbatch is not installed here"))
    else:
        checks.append(_signal_check(slurm, site.config.slurm.partition))
    if shutil.which("sacct", path=path) is None:
        checks.append(Check("accounting", None, "sacct is not installed: mt uses squeue only"))
    else:
        checks.append(_accounting_check(slurm))
    checks.append(_apptainer_check(transport, path, timeout_s))
    checks.append(_registry_check(site.registry_dir))
    checks.append(_private_check(site))
    python = site.config.slurm.python or sys.executable
    checks.append(_python_check(transport, python, timeout_s))
    checks.append(_llamacpp_check(site, env))
    return checks


def _llamacpp_check(site: Site, environ: Mapping[str, str]) -> Check:
    """Which server ``engine: llamacpp`` runs outside a container (hpc.llamacppserver)."""
    name = "llama.cpp server"
    try:
        server = host_server(site.config.llamacpp.server, environ)
    except EngineError as exc:
        return Check(name, False, exc.message, hint=exc.hint)
    if server.is_llama_server:
        return Check(name, True, server.describe())
    return Check(
        name,
        None,
        server.describe() + ": it refuses llama-server's flags (--ctx-size, --metrics, …)",
        hint=f"{BUILD_HINT}, or set llamacpp.server in site.yaml",
    )


def _slurm_commands_check(missing: list[str]) -> Check:
    if not missing:
        return Check("slurm commands", True, ", ".join(SLURM_COMMANDS) + " found")
    return Check(
        "slurm commands",
        False,
        f"not found on PATH: {', '.join(missing)}",
        hint="run mt on a Slurm login node (some sites need `module load slurm`)",
    )


def _squeue_check(client: SlurmClient) -> Check:
    try:
        result = client.run(["squeue", "--json"], check=False)
    except CommandTimeout as exc:
        return Check(
            "squeue --json",
            False,
            f"no answer within {exc.timeout_s:g}s",
            hint="slurmctld is slow or down; raise slurm.command_timeout_s in site.yaml",
        )
    except SlurmError as exc:
        return Check("squeue --json", False, exc.message, hint=exc.hint)
    if result.returncode != 0:
        first = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
        if "json" in result.stderr.lower() or "unrecognized" in result.stderr.lower():
            # Slurm before 20.11: hpc.slurm.client falls back to --format with a separator.
            return Check("squeue --json", None, f"not supported ({first}): mt uses --format")
        return Check(
            "squeue --json",
            False,
            f"squeue failed: {first or f'exit code {result.returncode}'}",
            hint=hint_for(result.stderr) or "`scontrol ping` says whether slurmctld answers",
        )
    try:
        data = _json_object(result.stdout)
        # Slurm 22.05 exits 0 when the controller does not answer, its failure under
        # "errors" and no jobs: read as the client reads it (hpc.slurm.client), not as "ok".
        jobs = parse_squeue_json(result)
    except ValueError as exc:
        return Check("squeue --json", False, f"squeue printed no JSON object: {exc}")
    except SlurmError as exc:
        return Check("squeue --json", False, exc.message, hint=exc.hint)
    meta = data.get("meta", {})
    release = meta.get("Slurm", {}).get("release") if isinstance(meta, dict) else None
    # 22.05's squeue --json also lists jobs that ended (until MinJobAge): count the pending
    # and running ones, the number a user compares with plain squeue.
    count = sum(1 for job in jobs.values() if job.state in PENDING_STATES | RUNNING_STATES)
    version = f"Slurm {release}, " if release else ""
    jobs_seen = f"{count} queued or running job{'' if count == 1 else 's'} visible"
    return Check("squeue --json", True, f"answers ({version}{jobs_seen})")


# What every job's script asks for (hpc.slurm.sbatch): USR1 to the batch shell before the end.
SIGNAL_FLAG = "--signal=B:USR1@120"


def _signal_check(client: SlurmClient, partition: str | None) -> Check:
    """Does sbatch take ``--signal=B:USR1@N``? ``--test-only`` validates without queueing."""
    argv = ["sbatch", "--test-only", SIGNAL_FLAG, "--time=5", "--wrap=true"]
    if partition:
        argv.insert(2, f"--partition={partition}")
    try:
        result = client.run(argv, check=False)
    except CommandTimeout as exc:
        return Check("sbatch --signal", None, f"no answer within {exc.timeout_s:g}s")
    except SlurmError as exc:
        return Check("sbatch --signal", None, exc.message, hint=exc.hint)
    said = " ".join(ln.strip() for ln in result.stderr.splitlines() if ln.strip())
    if result.returncode == 0:
        return Check(
            "sbatch --signal",
            True,
            f"sbatch --test-only {SIGNAL_FLAG} accepted ({said or 'no output'}): jobs get USR1 "
            "before their time limit and drain",
        )
    if "signal" in said.lower():
        return Check(
            "sbatch --signal",
            False,
            f"sbatch refused {SIGNAL_FLAG}: {said}",
            hint="without it jobs are cut at the time limit without draining: ask your admin; "
            "slurm.signal_grace_s in a model sets the lead time",
        )
    return Check(
        "sbatch --signal",
        None,
        f"sbatch --test-only failed, not over --signal: {said or result.returncode}",
        hint=hint_for(result.stderr) or "the squeue and probe checks say more",
    )


def _json_object(text: str) -> dict[str, Any]:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"a {type(data).__name__}")
    return data


def _accounting_check(client: SlurmClient) -> Check:
    argv = ["sacct", "--parsable2", "--noheader", "--starttime=now", "--format=JobID"]
    try:
        result = client.run(argv, check=False)
    except (CommandTimeout, SlurmError) as exc:
        return Check("accounting", None, f"sacct did not answer: {exc}")
    if result.returncode == 0:
        return Check("accounting", True, "on: sacct answers for jobs squeue has forgotten")
    if "accounting storage is disabled" in result.stderr:
        return Check(
            "accounting",
            None,
            "off (sacct: accounting storage is disabled): job states come from squeue only, "
            "and a finished job is forgotten after MinJobAge",
        )
    first = next((ln.strip() for ln in result.stderr.splitlines() if ln.strip()), "")
    return Check("accounting", None, f"sacct failed: {first}: job states come from squeue only")


def _apptainer_check(transport: LocalTransport, path: str, timeout_s: float) -> Check:
    found = shutil.which("apptainer", path=path)
    if found is None:
        return Check(
            "apptainer",
            None,
            "not on PATH here (the probe checks the compute node, where jobs run it)",
            hint=APPTAINER_HINT,
        )
    try:
        result = transport.run([found, "--version"], timeout_s=timeout_s)
    except (CommandTimeout, OSError) as exc:
        return Check("apptainer", False, f"{found} --version failed: {exc}", hint=APPTAINER_HINT)
    if result.returncode != 0:
        return Check(
            "apptainer",
            False,
            f"{found} --version exited {result.returncode}",
            hint=APPTAINER_HINT,
        )
    return Check("apptainer", True, f"{result.stdout.strip()} ({found})")


def _registry_check(path: Path) -> Check:
    if not path.exists():
        return Check("registry dir", None, f"{path} does not exist yet: mt creates it (0700)")
    if not path.is_dir():
        return Check(
            "registry dir",
            False,
            f"{path} is not a directory",
            hint="set registry_dir in site.yaml to a directory you own",
        )
    # Its mode and owner are the private-files check's (one rule: hpc.permissions).
    if not os.access(path, os.W_OK | os.X_OK):
        return Check(
            "registry dir",
            False,
            f"{path}: not writable",
            hint="set registry_dir in site.yaml to a directory you own",
        )
    return Check("registry dir", True, str(path))


def _private_check(site: Site) -> Check:
    """What every other `mt` command refuses to run with, reported here with its fix."""
    found = [found for path in site.private_paths() if (found := exposure(path)) is not None]
    if not found:
        return Check("private files", True, "MT_HOME, registry, records, keys: yours, 0700/0600")
    return Check(
        "private files",
        False,
        "other users can reach: " + "; ".join(e.describe() for e in found),
        hint=f"{fixes(found)} (until then every other mt command refuses to run)",
    )


# Run with the current directory off sys.path: `python -c` would import hpc from ./hpc
# when mt is run from a checkout, and say yes for a Python that has no ModelTainer.
_IMPORT_CHECK = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "import hpc, submitit; print(hpc.__version__, submitit.__version__, sys.version.split()[0])"
)


def _python_check(transport: LocalTransport, python: str, timeout_s: float) -> Check:
    hint = (
        "set slurm.python in site.yaml to a Python with modeltainer installed "
        "(`pip install modeltainer`), on a filesystem the compute nodes share"
    )
    try:
        result = transport.run([python, "-c", _IMPORT_CHECK], timeout_s=timeout_s)
    except FileNotFoundError:
        return Check("job python", False, f"{python} not found here", hint=hint)
    except (CommandTimeout, OSError) as exc:
        return Check("job python", False, f"{python}: {exc}", hint=hint)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return Check("job python", False, f"{python} cannot import hpc: {last}", hint=hint)
    hpc_version, submitit_version, py_version = [*result.stdout.split(), "?", "?", "?"][:3]
    if hpc_version != __version__:
        return Check(
            "job python",
            False,
            f"{python} has modeltainer {hpc_version}, this mt is {__version__}",
            hint="install the same modeltainer version for the jobs' Python",
        )
    return Check(
        "job python",
        True,
        f"{python} (Python {py_version}, modeltainer {hpc_version}, submitit {submitit_version})",
    )
