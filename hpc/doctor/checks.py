"""`mt doctor`: what works on this cluster, checked here and on a compute node.

``local_checks`` looks at the machine mt runs on: the Slurm commands and whether
``squeue --json`` answers (through ``SlurmClient``, like every Slurm command), accounting,
Apptainer, the registry directory, and the Python that jobs will run. ``probe_checks``
turns what the probe job (``hpc.slurm.probejob.run_probe``) saw on its node into report lines,
and ``diagnose`` runs both into a ``Diagnosis``. This module holds the checks and the
report; submitting and awaiting the probe lives in ``hpc.slurm.probejob``, and what runs on the
node in ``hpc.job.nodeprobe``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hpc import __version__
from hpc.errors import SlurmError
from hpc.site import Site
from hpc.slurm.client import SlurmClient, hint_for
from hpc.slurm.probejob import ProbeResult, run_probe
from hpc.transport import CommandTimeout, LocalTransport

_APPTAINER_HINT = (
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


@dataclass(frozen=True)
class Diagnosis:
    """Every check, and the probe (None when it did not run)."""

    checks: list[Check]
    probe: ProbeResult | None

    @property
    def ok(self) -> bool:
        """No check failed (not-applicable ones do not count)."""
        return not any(check.ok is False for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "ok": self.ok,
            "checks": [asdict(check) for check in self.checks],
            "probe": self.probe.to_dict() if self.probe else None,
        }


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
    if shutil.which("sacct", path=path) is None:
        checks.append(Check("accounting", None, "sacct is not installed: mt uses squeue only"))
    else:
        checks.append(_accounting_check(slurm))
    checks.append(_apptainer_check(transport, path, timeout_s))
    checks.append(_registry_check(site.registry_dir))
    python = site.config.slurm.python or sys.executable
    checks.append(_python_check(transport, python, timeout_s))
    return checks


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
    except ValueError as exc:
        return Check("squeue --json", False, f"squeue printed no JSON object: {exc}")
    meta = data.get("meta", {})
    release = meta.get("Slurm", {}).get("release") if isinstance(meta, dict) else None
    jobs = data.get("jobs", [])
    count = len(jobs) if isinstance(jobs, list) else 0
    version = f"Slurm {release}, " if release else ""
    jobs_seen = f"{count} job{'' if count == 1 else 's'} visible"
    return Check("squeue --json", True, f"answers ({version}{jobs_seen})")


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
            hint=_APPTAINER_HINT,
        )
    try:
        result = transport.run([found, "--version"], timeout_s=timeout_s)
    except (CommandTimeout, OSError) as exc:
        return Check("apptainer", False, f"{found} --version failed: {exc}", hint=_APPTAINER_HINT)
    if result.returncode != 0:
        return Check(
            "apptainer",
            False,
            f"{found} --version exited {result.returncode}",
            hint=_APPTAINER_HINT,
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
    info = path.stat()
    problems = []
    if info.st_uid != os.getuid():
        problems.append(f"owned by uid {info.st_uid}, not you")
    if info.st_mode & 0o077:
        problems.append(f"mode {info.st_mode & 0o777:o}: other users can read job keys")
    if not os.access(path, os.W_OK | os.X_OK):
        problems.append("not writable")
    if problems:
        return Check(
            "registry dir",
            False,
            f"{path}: {'; '.join(problems)}",
            hint=f"chmod 700 {shlex.quote(str(path))}, or set registry_dir in site.yaml "
            "to a directory you own",
        )
    return Check("registry dir", True, f"{path} (0700)")


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


# ---------------------------------------------------------------- the probe as checks


def probe_checks(result: ProbeResult, *, registry_dir: Path | None = None) -> list[Check]:
    """The probe's outcome and what it saw, as report lines."""
    where = f" on partition {result.partition}" if result.partition else ""
    if result.outcome == "rejected":
        return [
            Check(
                "probe job",
                False,
                f"sbatch refused the probe{where}: {result.reason}",
                hint=result.hint,
            )
        ]
    if result.outcome == "pending":
        cancelled = "cancelled" if result.cancelled else f"NOT cancelled (scancel {result.job_id})"
        return [
            Check(
                "probe job",
                False,
                f"job {result.job_id} still pending{where} after {result.waited_s:.0f}s "
                f"(reason: {result.reason}); {cancelled}",
                hint=result.hint,
            )
        ]
    if result.outcome in ("timeout", "failed") or result.report is None:
        return [
            Check("probe job", False, f"job {result.job_id}: {result.reason}", hint=result.hint)
        ]
    r = result.report
    checks = [
        Check(
            "probe job",
            True,
            f"job {result.job_id} ran on {r.get('slurmd_nodename')} "
            f"(host {r.get('hostname')}){where} in {result.waited_s:.0f}s",
        ),
        _node_python_check(r),
        _gpu_check(result.gpus, r),
        _driver_check(r),
        _node_apptainer_check(r),
        _nv_check(r),
        _rocm_check(r),
        Check(
            "cpus / memory",
            True,
            f"Slurm gave {r.get('slurm_cpus_on_node') or '?'} CPUs and "
            f"{r.get('slurm_mem_per_node_mb') or '?'} MB; the job may run on "
            f"{r.get('cpus_allowed')} CPUs; {r.get('mem_available_mb')} MB free on the node",
        ),
        _bind_check(r),
        _node_registry_check(r, registry_dir),
        Check("gateway → node", None, str(r.get("login_reachability", "not checked"))),
    ]
    return checks


def _node_python_check(r: Mapping[str, Any]) -> Check:
    detail = (
        f"{r.get('python')} (Python {r.get('python_version')}, "
        f"modeltainer {r.get('modeltainer_version')})"
    )
    if r.get("modeltainer_version") != __version__:
        return Check(
            "job python (node)",
            False,
            f"{detail}; this mt is {__version__}",
            hint="install the same modeltainer version for the jobs' Python",
        )
    return Check("job python (node)", True, detail)


def _gpu_check(gpus: int, r: Mapping[str, Any]) -> Check:
    visible = r.get("cuda_visible_devices") or r.get("rocr_visible_devices")
    if not gpus:
        return Check("gpus", None, f"none requested (--gpus N asks for some); visible: {visible}")
    count = len([d for d in str(visible or "").split(",") if d.strip()])
    detail = (
        f"asked {gpus}, CUDA_VISIBLE_DEVICES={visible!s}, SLURM_JOB_GPUS={r.get('slurm_job_gpus')}"
    )
    if count == gpus:
        return Check("gpus", True, detail)
    return Check(
        "gpus",
        False,
        detail,
        hint="Slurm allocated GPUs but did not expose them: check gres.conf (File=) and "
        "GresTypes on the node, or ask your admin",
    )


def _driver_check(r: Mapping[str, Any]) -> Check:
    for key, name in (("nvidia_smi", "nvidia-smi -L"), ("rocm_smi", "rocm-smi")):
        tool = r.get(key) or {}
        if tool.get("found"):
            output = "; ".join(tool.get("output") or [])
            if tool.get("returncode") == 0:
                return Check("gpu driver", True, f"{name}: {output or 'no output'}")
            return Check(
                "gpu driver",
                False,
                f"{name} failed ({tool.get('returncode')}): {output}",
                hint="the GPU driver on this node is broken or mismatched: tell your admin",
            )
    return Check(
        "gpu driver",
        None,
        "no nvidia-smi or rocm-smi on the node",
        hint="vLLM needs a GPU driver; llama.cpp on CPUs does not",
    )


def _node_apptainer_check(r: Mapping[str, Any]) -> Check:
    tool = r.get("apptainer") or {}
    if not tool.get("found"):
        return Check("apptainer (node)", None, "not on the node's PATH", hint=_APPTAINER_HINT)
    output = " ".join(tool.get("output") or [])
    if tool.get("returncode") != 0:
        return Check(
            "apptainer (node)", False, f"apptainer --version failed: {output}", hint=_APPTAINER_HINT
        )
    return Check("apptainer (node)", True, f"{output} ({tool.get('path')})")


def _nv_check(r: Mapping[str, Any]) -> Check:
    nv = r.get("apptainer_nv") or {}
    cli = nv.get("nvidia_container_cli")
    libs = nv.get("driver_libraries") or []
    parts = [
        f"nvidia-container-cli {'at ' + cli if cli else 'not found'}",
        f"driver libraries {', '.join(libs) if libs else 'not found'}",
        f"{len(nv.get('devices') or [])} /dev/nvidia* devices",
    ]
    found = bool(libs) and bool(nv.get("devices"))
    return Check(
        "apptainer --nv",
        True if found else None,
        "; ".join(parts),
        hint=None
        if found
        else "--nv needs the NVIDIA driver libraries on the node "
        "(ldconfig -p | grep libcuda); fine for CPU-only models",
    )


def _rocm_check(r: Mapping[str, Any]) -> Check:
    rocm = r.get("apptainer_rocm") or {}
    libs = rocm.get("driver_libraries") or []
    render = rocm.get("render_nodes") or []
    parts = [
        f"/dev/kfd {'present' if rocm.get('kfd') else 'missing'}",
        f"{len(render)} /dev/dri/renderD* nodes",
        f"ROCm libraries {', '.join(libs) if libs else 'not found'}",
    ]
    found = bool(rocm.get("kfd")) and bool(render) and bool(libs)
    return Check(
        "apptainer --rocm",
        True if found else None,
        "; ".join(parts),
        hint=None
        if found
        else "--rocm needs the amdgpu driver (/dev/kfd, /dev/dri) and ROCm libraries on the "
        "node; fine for NVIDIA or CPU-only models",
    )


def _bind_check(r: Mapping[str, Any]) -> Check:
    bind = r.get("bind") or {}
    if bind.get("ok"):
        return Check("bind 0.0.0.0", True, f"the job could listen on 0.0.0.0:{bind.get('port')}")
    return Check(
        "bind 0.0.0.0",
        False,
        f"the job could not listen on 0.0.0.0: {bind.get('error')}",
        hint="set engine_host in site.yaml to an address the node may bind",
    )


def _node_registry_check(r: Mapping[str, Any], registry_dir: Path | None) -> Check:
    seen = r.get("registry")
    if seen is None:
        where = f" ({registry_dir})" if registry_dir else ""
        return Check("registry (node)", None, f"not checked: no registry dir here yet{where}")
    if seen.get("writable"):
        return Check("registry (node)", True, f"{seen.get('path')} is shared and writable")
    state = "not writable" if seen.get("exists") else "not visible"
    return Check(
        "registry (node)",
        False,
        f"{seen.get('path')} is {state} on the node",
        hint="registry_dir must be on a filesystem shared by the login and compute nodes "
        "(set it in site.yaml)",
    )


# ---------------------------------------------------------------- everything


def diagnose(
    site: Site,
    *,
    probe: bool = True,
    gpus: int = 0,
    partition: str | None = None,
    timeout_s: float = 120.0,
    client: SlurmClient | None = None,
    environ: Mapping[str, str] | None = None,
    sbatch_extra: Mapping[str, str | bool] | None = None,
) -> Diagnosis:
    """The local checks, then (with ``probe``, where Slurm is here) the probe job's."""
    checks = local_checks(site, client=client, environ=environ)
    if not probe:
        return Diagnosis(checks, None)
    slurm_ok = next(c.ok for c in checks if c.name == "slurm commands")
    if not slurm_ok:
        checks.append(Check("probe job", None, "skipped: no Slurm commands here"))
        return Diagnosis(checks, None)
    result = run_probe(
        site,
        gpus=gpus,
        partition=partition,
        timeout_s=timeout_s,
        folder=site.log_dir / "doctor",
        client=client,
        sbatch_extra=sbatch_extra,
    )
    if result.outcome == "ok":
        # slurm.python names the Python as compute nodes see it: one missing here but
        # run by the probe on the node is fine.
        checks = [
            replace(c, ok=None, detail=f"{c.detail} (the node runs it: see job python (node))")
            if c.name == "job python" and c.ok is False and "not found here" in c.detail
            else c
            for c in checks
        ]
    return Diagnosis(checks + probe_checks(result, registry_dir=site.registry_dir), result)
