"""What the probe job runs on a compute node: ``node_probe`` and the helpers it calls.

``node_probe`` reports what a job sees on its node (hostname, the GPUs, CPUs and memory
Slurm gave it, GPU drivers, Apptainer and what ``--nv`` needs, whether it can bind
0.0.0.0, whether the registry directory is shared, whether the node-local staging directory
is writable and how much room it has, the node's address as Ray's head would bind it) as
plain data. It is apart from the
doctor and the probe job because it runs inside a submitit job, under whatever Python
``slurm.python`` names: it imports only the standard library (and ``hpc.__version__``), so
the node needs nothing beyond ModelTainer itself, and submitit unpickles it by reference
as ``hpc.job.nodeprobe.node_probe``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hpc import __version__


def node_probe(
    *, registry_dir: str | None = None, staging_dir: str | None = None
) -> dict[str, Any]:
    """What a job sees on its node. Runs inside the Slurm job; never raises for a missing tool.

    Plain data only (it travels back as a pickle and is printed as JSON). ``registry_dir``:
    whether the login node's registry directory is visible here (it must be shared).
    ``staging_dir``: site.yaml's ``staging.dir`` (``$TMPDIR`` or a path), checked here.
    """
    env = os.environ
    report: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "slurmd_nodename": env.get("SLURMD_NODENAME"),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_gpus": env.get("SLURM_JOB_GPUS"),
        "rocr_visible_devices": env.get("ROCR_VISIBLE_DEVICES"),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "slurm_cpus_on_node": env.get("SLURM_CPUS_ON_NODE"),
        "mem_available_mb": _mem_available_mb(),
        "slurm_mem_per_node_mb": env.get("SLURM_MEM_PER_NODE"),
        "python": sys.executable,
        "python_version": sys.version.split()[0],
        "modeltainer_version": __version__,
        "nvidia_smi": _tool("nvidia-smi", "-L"),
        "rocm_smi": _tool("rocm-smi", "--showproductname"),
        "apptainer": _tool("apptainer", "--version"),
        "apptainer_nv": _nv_support(),
        "apptainer_rocm": _rocm_support(),
        "bind": _bind_any(),
        "login_reachability": "not checked: whether the login node's gateway can reach a "
        "port on this node is out of scope for the probe",
        "registry": _registry_on_node(registry_dir),
        "staging": _staging_on_node(staging_dir),
        "node_address": _node_address(),
    }
    return report


def _mem_available_mb() -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return None


def _tool(name: str, *args: str) -> dict[str, Any]:
    """``name args`` if ``name`` is on PATH: found, exit code, the first lines of its output."""
    path = shutil.which(name)
    if path is None:
        return {"found": False}
    try:
        done = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return {"found": True, "path": path, "returncode": None, "output": ["timed out"]}
    except OSError as exc:
        return {"found": True, "path": path, "returncode": None, "output": [str(exc)]}
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"found": True, "path": path, "returncode": done.returncode, "output": lines[:16]}


def _shared_libraries(*wanted: str) -> list[str]:
    """Which of ``wanted`` (library name prefixes) the dynamic linker knows (ldconfig -p)."""
    ldconfig = shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")
    if ldconfig is None:
        return []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, timeout=30, check=False
        )
        return sorted({w for line in done.stdout.splitlines() for w in wanted if w in line})
    return []


def _nv_support() -> dict[str, Any]:
    """What ``apptainer exec --nv`` looks for: nvidia-container-cli, driver libraries, devices."""
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia*"))
    return {
        "nvidia_container_cli": shutil.which("nvidia-container-cli"),
        "driver_libraries": _shared_libraries("libcuda.so", "libnvidia-ml.so"),
        "devices": devices[:16],
    }


def _rocm_support() -> dict[str, Any]:
    """What ``apptainer exec --rocm`` needs: /dev/kfd, DRI render nodes, the ROCm libraries."""
    render = sorted(str(p) for p in Path("/dev/dri").glob("renderD*"))
    return {
        "kfd": Path("/dev/kfd").exists(),
        "render_nodes": render[:16],
        "driver_libraries": _shared_libraries("libamdhip64.so", "libhsa-runtime64.so"),
    }


def _bind_any() -> dict[str, Any]:
    """Can the job listen on 0.0.0.0 (where cluster engines bind)? Port 0: any free one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0", 0))  # noqa: S104 - what a served model's engine does
            s.listen(1)
            return {"ok": True, "port": s.getsockname()[1]}
    except OSError as exc:
        return {"ok": False, "error": str(exc)}


def _registry_on_node(registry_dir: str | None) -> dict[str, Any] | None:
    if registry_dir is None:
        return None
    path = Path(registry_dir)
    return {
        "path": registry_dir,
        "exists": path.is_dir(),
        "writable": path.is_dir() and os.access(path, os.W_OK | os.X_OK),
    }


def _staging_on_node(setting: str | None) -> dict[str, Any] | None:
    """The staging directory (as hpc.job.staging.cache_root resolves ``$TMPDIR``): can a file
    be made in it, and how much room is there."""
    if setting is None:
        return None
    path = (
        Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
        if setting == "$TMPDIR"
        else Path(setting)
    )
    found: dict[str, Any] = {"setting": setting, "path": str(path), "exists": path.is_dir()}
    try:
        fd, name = tempfile.mkstemp(prefix=".mt-doctor-", dir=path)
        os.close(fd)
        os.unlink(name)
        found["writable"] = True
    except OSError as exc:
        found["writable"] = False
        found["error"] = str(exc)
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(path)
        found["free_bytes"] = usage.free
        found["total_bytes"] = usage.total
    return found


def _node_address() -> dict[str, Any]:
    """The address a multi-node job's Ray head binds (the hostname, resolved), and whether a
    port can be bound on it (hpc.job.raycluster)."""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError as exc:
        return {"address": None, "error": str(exc)}
    found: dict[str, Any] = {"address": address, "loopback": address.startswith("127.")}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
            found["bind_ok"] = True
    except OSError as exc:
        found["bind_ok"] = False
        found["error"] = str(exc)
    return found
