"""`mt doctor`: what the probe job (``hpc.slurm.probejob.run_probe``) saw on its compute node,
as report lines (what runs on the node is ``hpc.job.nodeprobe``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpc import __version__
from hpc.doctor.checks import APPTAINER_HINT, Check
from hpc.slurm.probejob import ProbeResult


def probe_checks(
    result: ProbeResult, *, registry_dir: Path | None = None, staging_max_bytes: int | None = None
) -> list[Check]:
    """The probe's outcome and what it saw, as report lines (``staging_max_bytes``: site.yaml's
    staging.max_bytes, the room the cache may want)."""
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
        _staging_check(r, staging_max_bytes),
        _ray_address_check(r),
        Check(
            "ray ports (multi-node)",
            None,
            "not checked: whether compute nodes reach each other's ports (Ray's head port, "
            "node and object manager ports, worker ports 10002-19999) takes a job on two "
            "nodes; neither this login node nor a one-node probe can see it",
            hint="only for models with resources.nodes > 1: ask your admin whether compute "
            "nodes may open TCP connections to each other on unprivileged ports",
        ),
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
        return Check("apptainer (node)", None, "not on the node's PATH", hint=APPTAINER_HINT)
    output = " ".join(tool.get("output") or [])
    if tool.get("returncode") != 0:
        return Check(
            "apptainer (node)", False, f"apptainer --version failed: {output}", hint=APPTAINER_HINT
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


def _gb(n: object) -> str:
    return f"{int(n) / 1e9:.1f} GB" if isinstance(n, int) else "? GB"


def _staging_check(r: Mapping[str, Any], max_bytes: int | None) -> Check:
    """weights.stage: node-local needs a writable node-local directory with room."""
    seen = r.get("staging")
    if seen is None:
        return Check("staging dir (node)", None, "not checked (an older probe)")
    where = f"{seen.get('path')} (staging.dir {seen.get('setting')})"
    hint = "set staging.dir in site.yaml to a node-local directory you may write (e.g. /dev/shm)"
    if not seen.get("writable"):
        return Check(
            "staging dir (node)", False, f"{where}: not writable: {seen.get('error')}", hint=hint
        )
    free = seen.get("free_bytes")
    room = f"{_gb(free)} free of {_gb(seen.get('total_bytes'))}"
    if max_bytes is not None and isinstance(free, int) and free < max_bytes:
        return Check(
            "staging dir (node)",
            None,
            f"{where}: writable, {room}: less than staging.max_bytes ({_gb(max_bytes)})",
            hint="weights bigger than the free space are not staged (the engine reads them "
            "from weights.source); lower staging.max_bytes or pick a larger staging.dir",
        )
    return Check("staging dir (node)", True, f"{where}: writable, {room}")


def _ray_address_check(r: Mapping[str, Any]) -> Check:
    """A multi-node job's Ray head binds the node's resolved hostname; loopback reaches no node."""
    seen = r.get("node_address") or {}
    address = seen.get("address")
    hint = (
        "the node's hostname must resolve to an address other nodes reach (/etc/hosts or DNS); "
        "only models with resources.nodes > 1 need it"
    )
    if address is None:
        return Check("node address (ray head)", None, f"unresolved: {seen.get('error')}", hint=hint)
    if seen.get("loopback"):
        return Check(
            "node address (ray head)",
            None,
            f"{r.get('hostname')} resolves to {address}: a multi-node job's other nodes could "
            "not reach its Ray head",
            hint=hint,
        )
    if not seen.get("bind_ok"):
        return Check(
            "node address (ray head)",
            False,
            f"cannot bind {address}: {seen.get('error')}",
            hint=hint,
        )
    return Check("node address (ray head)", True, f"{address}: a Ray head could listen there")
