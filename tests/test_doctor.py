"""`mt doctor`: local checks here, and the submitit probe on the real private Slurm cluster.

The cluster has no accounting (sacct fails), so these tests also show that the probe
does not depend on sacct: its result arrives, and a held job is seen and cancelled.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
from mtcli import mt
from slurmcluster import SlurmCluster

from hpc.doctor.checks import local_checks
from hpc.doctor.diagnosis import diagnose
from hpc.job.nodeprobe import node_probe
from hpc.registry import Registry
from hpc.site import Site, load_site
from hpc.slurm.probejob import run_probe

HOSTILE = "we ird'\"; echo x"


def active_jobs(cluster: SlurmCluster) -> list[dict[str, object]]:
    return [j for j in cluster.jobs() if j["job_state"] in ("PENDING", "RUNNING", "CONFIGURING")]


def by_name(checks: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {c["name"]: c for c in checks}


# ---------------------------------------------------------------- without Slurm


def empty_path(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "empty-bin"
    bin_dir.mkdir(exist_ok=True)
    return {"PATH": str(bin_dir)}


def test_without_apptainer_or_slurm_checks_say_what_to_do(tmp_path: Path) -> None:
    site = load_site(None)
    checks = {c.name: c for c in local_checks(site, environ=empty_path(tmp_path))}
    apptainer = checks["apptainer"]
    assert apptainer.ok is None
    assert apptainer.hint is not None
    assert "ask your admin" in apptainer.hint
    assert "module load apptainer" in apptainer.hint
    assert checks["slurm commands"].ok is False
    assert "sbatch" in checks["slurm commands"].detail
    assert checks["squeue --json"].ok is None
    # The job Python is found by its path, not PATH: it is this one, and it imports hpc.
    assert checks["job python"].ok is True, checks["job python"]


def test_the_llama_cpp_server_is_named(tmp_path: Path) -> None:
    """Which server `engine: llamacpp` runs: llama-server where found, else the fallback."""
    env = {**empty_path(tmp_path), "HOME": str(tmp_path / "home")}
    line = next(c for c in local_checks(load_site(None), environ=env) if c.name.startswith("llama"))
    assert line.ok is None and "llama-cpp-python" in line.detail
    assert line.hint and "python -m hpc.dev.llama_server" in line.hint
    server = tmp_path / "empty-bin" / "llama-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    line = next(c for c in local_checks(load_site(None), environ=env) if c.name.startswith("llama"))
    assert line.ok is True and str(server) in line.detail
    site = tmp_path / "site.yaml"
    site.write_text(f"llamacpp: {{server: {tmp_path / 'missing'}}}\n")
    checks = local_checks(load_site(site), environ=env)
    line = next(c for c in checks if c.name.startswith("llama"))
    assert line.ok is False and "llamacpp.server" in line.detail and line.hint


def test_without_slurm_the_probe_is_skipped_not_crashed(tmp_path: Path) -> None:
    diagnosis = diagnose(load_site(None), probe=True, environ=empty_path(tmp_path))
    assert diagnosis.probe is None
    assert not diagnosis.ok  # no sbatch is a failure on a machine meant to submit
    probe = next(c for c in diagnosis.checks if c.name == "probe job")
    assert probe.ok is None
    assert "skipped" in probe.detail


def test_apptainer_version_is_reported(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apptainer"
    # Stands for Apptainer (not packaged for Debian 12): answers --version as 1.3 does.
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "apptainer version 1.3.4"\n')
    fake.chmod(0o755)
    checks = {c.name: c for c in local_checks(load_site(None), environ={"PATH": str(bin_dir)})}
    assert checks["apptainer"].ok is True
    assert "apptainer version 1.3.4" in checks["apptainer"].detail


def test_registry_readable_by_others_fails(tmp_path: Path) -> None:
    site = load_site(None)
    site.home.mkdir(mode=0o700)
    site.registry_dir.mkdir(mode=0o755)
    site.registry_dir.chmod(0o755)
    check = next(
        c for c in local_checks(site, environ=empty_path(tmp_path)) if c.name == "private files"
    )
    assert check.ok is False
    assert f"{site.registry_dir} (directory, mode 0755; want 0700)" in check.detail
    assert check.hint is not None
    assert f"chmod 700 {site.registry_dir}" in check.hint
    site.registry_dir.chmod(0o700)
    check = next(
        c for c in local_checks(site, environ=empty_path(tmp_path)) if c.name == "private files"
    )
    assert check.ok is True


def test_job_python_without_modeltainer_fails(tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text("slurm:\n  python: /nonexistent/bin/python3\n", encoding="utf-8")
    site = load_site(site_file)
    check = next(
        c for c in local_checks(site, environ=empty_path(tmp_path)) if c.name == "job python"
    )
    assert check.ok is False
    assert check.hint is not None
    assert "slurm.python" in check.hint


def test_node_probe_reports_plain_data_here() -> None:
    report = node_probe(registry_dir=None)
    assert report["hostname"] == socket.gethostname()
    assert report["slurmd_nodename"] is None  # not in a Slurm job
    assert report["cpus_allowed"] == len(os.sched_getaffinity(0))
    assert report["bind"]["ok"] is True
    assert report["bind"]["port"] > 0
    assert report["apptainer"]["found"] in (True, False)
    assert "out of scope" in report["login_reachability"]
    json.dumps(report)  # travels as a pickle, printed as JSON


def test_cli_no_probe_json_without_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hpc.cli import main

    monkeypatch.setenv("PATH", empty_path(tmp_path)["PATH"])
    code = main(["doctor", "--no-probe", "--json"])
    out, err = capsys.readouterr()
    assert code == 1, err
    data = json.loads(out)
    assert data["ok"] is False
    assert data["probe"] is None
    assert by_name(data["checks"])["apptainer"]["ok"] is None


# ---------------------------------------------------------------- on the real cluster


def probe_site(home: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    monkeypatch.setenv("MT_HOME", str(home))
    return load_site(None)


@pytest.mark.slurm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("home_name", ["mt-home", HOSTILE], ids=["plain", "hostile-path"])
def test_probe_sees_two_gpus_without_sacct(
    cluster: SlurmCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    home_name: str,
) -> None:
    sacct = cluster.run(["sacct", "--parsable2"], timeout=30)
    assert "accounting storage is disabled" in sacct.stderr  # the case this test is about
    site = probe_site(tmp_path / home_name, monkeypatch)
    folder = site.log_dir / "doctor"

    result = run_probe(site, gpus=2, partition=None, timeout_s=60, folder=folder)

    assert result.outcome == "ok", result
    report = result.report
    assert report is not None
    assert report["hostname"] == socket.gethostname()
    assert report["slurmd_nodename"] in {"gpu1", "gpu2"}
    assert report["cuda_visible_devices"] == "0,1"
    assert report["slurm_job_id"] == result.job_id
    assert report["bind"]["ok"] is True
    assert 0 < report["bind"]["port"] < 65536
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert result.log_path is not None
    assert Path(result.log_path).is_file()
    # The result came without asking submitit for a state (which would call sacct).
    assert "Bypassing sacct error" not in caplog.text
    assert not active_jobs(cluster)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_held_probe_is_reported_pending_and_cancelled(
    cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    site = probe_site(tmp_path / "mt-home", monkeypatch)

    result = run_probe(
        site,
        gpus=1,
        partition="debug",
        timeout_s=4,
        folder=site.log_dir / "doctor",
        sbatch_extra={"hold": True},
    )

    assert result.outcome == "pending", result
    assert result.reason == "JobHeldUser"
    assert result.hint is not None
    assert "held" in result.hint
    assert result.cancelled
    assert result.waited_s >= 4
    assert result.partition == "debug"
    assert not active_jobs(cluster)
    seen = {str(j["job_id"]): j["job_state"] for j in cluster.jobs()}
    assert seen.get(result.job_id, "CANCELLED") == "CANCELLED"


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_probe_that_dies_without_result_is_failed_not_awaited_forever(
    cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Without sacct, submitit would call this job UNKNOWN and wait for its result forever.
    home = tmp_path / "mt-home"
    home.mkdir(mode=0o700)
    (home / "site.yaml").write_text("slurm:\n  python: /nonexistent/bin/python3\n")
    site = probe_site(home, monkeypatch)

    result = run_probe(site, gpus=0, partition=None, timeout_s=60, folder=site.log_dir / "doctor")

    assert result.outcome == "failed", result
    assert result.state == "FAILED"
    assert "/nonexistent/bin/python3" in result.reason
    assert result.hint is not None
    assert "slurm.python" in result.hint
    assert result.waited_s < 60  # noticed when the job ended, not at the timeout
    assert not active_jobs(cluster)


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_cli_doctor_json_with_one_gpu(cluster: SlurmCluster, tmp_path: Path) -> None:
    home = Path(os.environ["MT_HOME"])
    Registry(home / "registry").ensure()  # so the probe checks the node sees it too

    done = mt("doctor", "--json", "--gpus", "1", "--timeout", "60")

    data = json.loads(done.stdout)
    assert data["ok"] is True, done.stdout
    probe = data["probe"]
    assert probe["outcome"] == "ok"
    assert probe["gpus"] == 1
    assert probe["report"]["cuda_visible_devices"] == "0"
    assert probe["report"]["slurmd_nodename"] in {"gpu1", "gpu2"}
    checks = by_name(data["checks"])
    assert checks["probe job"]["ok"] is True
    assert checks["job python (node)"]["ok"] is True
    assert checks["gpus"]["ok"] is True
    assert checks["bind 0.0.0.0"]["ok"] is True
    assert checks["registry (node)"]["ok"] is True
    assert checks["gateway → node"]["ok"] is None
    assert checks["accounting"]["ok"] is None  # sacct-less: noted, not failed
    # What node-local staging, the time-limit warning and multi-node jobs need.
    assert checks["sbatch --signal"]["ok"] is True, checks["sbatch --signal"]
    assert "--signal=B:USR1@120 accepted" in checks["sbatch --signal"]["detail"]
    staging = checks["staging dir (node)"]
    assert (
        staging["ok"] is True and "writable" in staging["detail"] and "GB free" in staging["detail"]
    )
    assert probe["report"]["staging"]["free_bytes"] > 0
    # This machine's hostname resolves to loopback: said, with what to do, not failed.
    address = probe["report"]["node_address"]
    assert checks["node address (ray head)"]["ok"] is (None if address["loopback"] else True)
    ray_ports = checks["ray ports (multi-node)"]
    assert ray_ports["ok"] is None and "not checked" in ray_ports["detail"]
    assert checks["squeue --json"]["ok"] is True
    # 22.05 lists ended jobs too (the probe's, just finished): only live ones are counted.
    assert "(Slurm 22.05.8, 0 queued or running jobs visible)" in checks["squeue --json"]["detail"]
    assert not active_jobs(cluster)


@pytest.mark.slurm
@pytest.mark.timeout(120)
def test_cli_doctor_unschedulable_probe_is_reported_with_hint(cluster: SlurmCluster) -> None:
    more_than_any_node = str(cluster.gpus_per_node * len(cluster.nodes) * 2)

    done = mt("doctor", "--gpus", more_than_any_node, "--timeout", "20", check=False)

    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    text = " ".join(done.stdout.split())  # rich wraps the table at 80 columns in a pipe
    assert "✗ probe job sbatch refused the probe" in text
    assert "Requested node configuration is not available" in text
    assert "hint: no node has all you asked for: `sinfo" in text

    done = mt("doctor", "--json", "--gpus", more_than_any_node, "--timeout", "20", check=False)
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["probe"]["outcome"] == "rejected"
    assert data["probe"]["job_id"] is None
    assert "sinfo" in by_name(data["checks"])["probe job"]["hint"]
    assert not active_jobs(cluster)


def test_rocm_check_reports_what_apptainer_rocm_needs() -> None:
    from hpc.doctor.probe import _rocm_check

    ready = {
        "apptainer_rocm": {
            "kfd": True,
            "render_nodes": ["/dev/dri/renderD128"],
            "driver_libraries": ["libamdhip64.so"],
        }
    }
    check = _rocm_check(ready)
    assert check.ok is True and check.hint is None
    assert "/dev/kfd present" in check.detail and "libamdhip64.so" in check.detail
    missing = _rocm_check(
        {"apptainer_rocm": {"kfd": False, "render_nodes": [], "driver_libraries": []}}
    )
    assert missing.ok is None  # not applicable on NVIDIA or CPU-only nodes, not a failure
    assert missing.hint is not None and "/dev/kfd" in missing.hint


# ---------------------------------------------------------------- what staging, the time-limit
# warning and multi-node jobs need


def test_node_probe_checks_the_staging_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    seen = node_probe(staging_dir="$TMPDIR")["staging"]
    assert seen["path"] == str(tmp_path) and seen["writable"] is True
    assert seen["free_bytes"] > 0 and seen["total_bytes"] >= seen["free_bytes"]
    assert list(tmp_path.iterdir()) == []  # its test file is gone
    missing = node_probe(staging_dir=str(tmp_path / "nope"))["staging"]
    assert missing["writable"] is False and missing["exists"] is False
    assert node_probe()["staging"] is None


def test_staging_check_says_what_is_wrong() -> None:
    from hpc.doctor.probe import _staging_check

    base = {"setting": "/local", "path": "/local", "exists": True}
    good = _staging_check({"staging": {**base, "writable": True, "free_bytes": 5 * 10**9}}, None)
    assert good.ok is True and "5.0 GB free" in good.detail
    bad = _staging_check({"staging": {**base, "writable": False, "error": "Read-only"}}, None)
    assert bad.ok is False and "Read-only" in bad.detail
    assert bad.hint is not None and "staging.dir" in bad.hint
    small = {"staging": {**base, "writable": True, "free_bytes": 10**9}}
    tight = _staging_check(small, 2 * 10**9)
    assert tight.ok is None and "less than staging.max_bytes (2.0 GB)" in tight.detail


def test_ray_head_address_check() -> None:
    from hpc.doctor.probe import _ray_address_check

    good = {"node_address": {"address": "10.1.2.3", "loopback": False, "bind_ok": True}}
    assert _ray_address_check(good).ok is True
    loop = _ray_address_check(
        {"hostname": "n1", "node_address": {"address": "127.0.1.1", "loopback": True}}
    )
    assert loop.ok is None and "n1 resolves to 127.0.1.1" in loop.detail
    assert loop.hint is not None and "/etc/hosts" in loop.hint
    unbound = {"node_address": {"address": "10.1.2.3", "loopback": False, "bind_ok": False}}
    assert _ray_address_check(unbound).ok is False


def test_sbatch_refusing_signal_fails_the_check(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sbatch"
    # Stands for an sbatch that refuses the flag, with Slurm's own message for a bad --signal.
    fake.write_text('#!/bin/sh\necho "sbatch: error: Invalid --signal specification" >&2\nexit 1\n')
    fake.chmod(0o755)
    checks = {c.name: c for c in local_checks(load_site(None), environ={"PATH": str(bin_dir)})}
    signal_check = checks["sbatch --signal"]
    assert signal_check.ok is False
    assert "Invalid --signal specification" in signal_check.detail
    assert signal_check.hint is not None and "time limit" in signal_check.hint


@pytest.mark.slurm
@pytest.mark.timeout(180)
def test_squeue_check_with_the_controller_down_fails_on_22_05(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Slurm 22.05's ``squeue --json`` exits 0 when it cannot reach the controller (its
    failure under "errors", no jobs): the check must say so, not "answers"."""
    from hpc.doctor.checks import _squeue_check
    from hpc.slurm.client import SlurmClient
    from hpc.transport import LocalTransport

    conf = tmp_path / "slurm.conf"
    with socket.socket() as s:  # a loopback port nobody listens on: the controller is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lines = slurm_cluster.conf_path.read_text().splitlines()
    conf.write_text(
        "\n".join(f"SlurmctldPort={port}" if x.startswith("SlurmctldPort=") else x for x in lines)
        + "\n"
    )
    env = {"PATH": os.environ["PATH"], "SLURM_CONF": str(conf)}
    check = _squeue_check(SlurmClient(LocalTransport(env), timeout_s=120))
    assert check.ok is False, check
    assert check.detail.startswith("squeue failed: "), check
    assert check.hint is not None and "scontrol ping" in check.hint
