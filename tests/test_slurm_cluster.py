"""The private Slurm cluster (tests/slurmcluster.py) behaves like the real Slurm our code targets.

These tests pin what Slurm 22.05.8 (Debian 12 ``slurm-wlm``) really prints and emits, so
code that parses it can rely on the following (observed on this cluster):

* ``sbatch --parsable`` prints ``<job_id>\\n`` (no ``;cluster`` suffix without federation).
* GPUs: ``--gres=gpu:2`` gives ``CUDA_VISIBLE_DEVICES=0,1``; two ``--gres=gpu:1`` jobs on
  one node get ``0`` and ``1``; ``SLURM_JOB_GPUS`` equals ``CUDA_VISIBLE_DEVICES``.
  ``--gres=gpu:fake:1`` (with the type) works too.
* ``squeue --json`` (``meta.plugin.type`` = ``openapi/v0.0.38``) returns
  ``{"meta", "errors": [], "jobs": [...]}``; each job has ``job_id`` (int), ``job_state``
  (``PENDING``, ``RUNNING``, ``COMPLETING``, ``COMPLETED``, ``CANCELLED``, ``FAILED``),
  ``state_reason`` (``None``, ``JobHeldUser``, ``Resources``, ``PartitionNodeLimit``,
  ``BadConstraints``, ``NonZeroExitCode``), ``state_description`` (``""``), ``nodes``
  (``"gpu1"``, ``"gpu[1-2]"``, ``""`` while pending), ``batch_host``, ``partition``,
  ``name`` (``wrap`` for ``--wrap``), ``user_name``, ``exit_code``, ``tres_per_node``
  (``"gres:gpu:2"``), ``gres_detail`` (``["gpu:fake:1(IDX:0)"]`` while running, ``[]``
  once finished), ``current_working_directory``, ``submit_time``/``start_time``/
  ``end_time`` (epoch seconds). ``standard_output`` is ``""`` (use ``scontrol show job``'s
  ``StdOut=``). ``exit_code`` is the raw wait status: ``exit 3`` gives ``768``, a job
  cancelled while its script runs gives ``15``; one cancelled right after it turned
  ``RUNNING`` but before slurmstepd started the script gives ``9``. ``RUNNING`` means
  slurmctld launched the job, not that the script has started.
* ``squeue --json`` IGNORES every filter option in 22.05 (``-j``, ``-t``, ``-p``, ``-u``,
  ``--name``): it always returns all jobs, so callers must filter by ``job_id`` themselves.
  Unlike plain ``squeue`` it also lists finished jobs until they are purged (``MinJobAge``,
  5 s here; gone about 8 s after the end). Plain ``squeue -j <unknown>`` and
  ``scontrol show job <unknown>`` exit 1 with stderr
  ``slurm_load_jobs error: Invalid job id specified\\n``. ``scontrol`` has no ``--json``
  in 22.05 (``scontrol: unrecognized option '--json'``). ``sinfo --json`` has
  ``{"meta", "errors", "nodes"}`` with per node ``name``, ``state`` (``idle``, ``mixed``,
  ...), ``gres`` (``gpu:fake:2``), ``gres_used``.
* ``sacct`` (any options) exits 1, stdout empty, stderr exactly
  ``Slurm accounting storage is disabled\\n``.
* ``scancel <id>`` exits 0 silently, also for an unknown id; the job turns ``CANCELLED``.
* ``sbatch --hold``: ``PENDING`` with ``state_reason`` ``JobHeldUser`` (``squeue -o %r``
  prints the same); ``scontrol release <id>`` lets it run.
* ``sbatch -p nope`` exits 1, stderr exactly
  ``sbatch: error: invalid partition specified: nope\\n``
  ``sbatch: error: Batch job submission failed: Invalid partition name specified\\n``.
* Other rejections (exit 1): ``-w gpu9`` gives ``sbatch: error: Batch job submission
  failed: Invalid node name specified``; ``--gres=gpu:3`` gives ``sbatch: error: Batch job
  submission failed: Requested node configuration is not available`` (and ``--mem`` too
  large first prints ``sbatch: error: Memory specification can not be satisfied``); such a
  rejected submission still uses up a job id and leaves a ``FAILED``/``BadConstraints``
  record in ``squeue --json``. ``--nodes=3`` is *accepted* and stays ``PENDING`` with
  ``PartitionNodeLimit`` (``EnforcePartLimits`` is off by default).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(90)]

ACCOUNTING_DISABLED = "Slurm accounting storage is disabled\n"
BAD_PARTITION = (
    "sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster; every job a test left behind is cancelled afterwards."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


def _job(cluster: SlurmCluster, job_id: int) -> dict[str, Any]:
    for job in cluster.jobs():
        if job["job_id"] == job_id:
            return job
    raise AssertionError(f"job {job_id} not in squeue --json")


def _wait_until_running(cluster: SlurmCluster, *job_ids: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = {j["job_id"]: j["job_state"] for j in cluster.jobs() if j["job_id"] in job_ids}
        if all(states.get(i) == "RUNNING" for i in job_ids):
            return
        assert time.monotonic() < deadline, f"jobs not all RUNNING: {states}"
        time.sleep(0.1)


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_two_idle_nodes_with_two_fake_gpus_each(cluster: SlurmCluster) -> None:
    proc = cluster.run(["sinfo", "-h", "-N", "-o", "%N %P %t %G"], check=True)
    rows = sorted(set(proc.stdout.split("\n")) - {""})
    assert rows == [
        "gpu1 debug idle gpu:fake:2",
        "gpu1 gpu* idle gpu:fake:2",
        "gpu2 debug idle gpu:fake:2",
        "gpu2 gpu* idle gpu:fake:2",
    ]
    assert cluster.start_seconds < 30


def test_two_gpu_job_sees_both_devices(cluster: SlurmCluster) -> None:
    out = cluster.work_dir / "two-gpus.out"
    proc = cluster.run(
        [
            "sbatch",
            "--parsable",
            "--gres=gpu:2",
            f"--output={out}",
            "--wrap",
            "echo CVD=$CUDA_VISIBLE_DEVICES",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"\d+\n", proc.stdout)
    job_id = int(proc.stdout)
    assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"
    assert _output(out) == "CVD=0,1\n"


def test_two_one_gpu_jobs_on_one_node_get_different_devices(cluster: SlurmCluster) -> None:
    script = "echo CVD=$CUDA_VISIBLE_DEVICES GPUS=$SLURM_JOB_GPUS NODE=$SLURMD_NODENAME; sleep 3"
    outs = [cluster.work_dir / f"one-gpu-{i}.out" for i in range(2)]
    ids = [
        cluster.sbatch("-w", "gpu1", "--gres=gpu:1", f"--output={out}", "--wrap", script)
        for out in outs
    ]
    _wait_until_running(cluster, *ids)
    details = sorted(d for i in ids for d in _job(cluster, i)["gres_detail"])
    assert details == ["gpu:fake:1(IDX:0)", "gpu:fake:1(IDX:1)"]
    assert {_job(cluster, i)["nodes"] for i in ids} == {"gpu1"}
    for job_id in ids:
        assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"
    lines = sorted(_output(out) for out in outs)
    assert lines == ["CVD=0 GPUS=0 NODE=gpu1\n", "CVD=1 GPUS=1 NODE=gpu1\n"]


def test_two_node_job_runs_a_step_on_each_node(cluster: SlurmCluster) -> None:
    out = cluster.work_dir / "two-nodes.out"
    step = "echo ID=$SLURM_NODEID NODE=$SLURMD_NODENAME TASK=$SLURM_PROCID"
    job_id = cluster.sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={out}",
        "--wrap",
        f"srun bash -c '{step}'",
    )
    assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"
    assert sorted(_output(out).splitlines()) == [
        "ID=0 NODE=gpu1 TASK=0",
        "ID=1 NODE=gpu2 TASK=1",
    ]


def test_squeue_json_has_job_id_and_state(cluster: SlurmCluster) -> None:
    job_id = cluster.sbatch("-J", "mt-json", "--gres=gpu:1", "--wrap", "sleep 30")
    _wait_until_running(cluster, job_id)
    proc = cluster.run(["squeue", "--json"], check=True)
    doc = json.loads(proc.stdout)
    assert doc["meta"]["plugin"]["type"] == "openapi/v0.0.38"
    assert doc["meta"]["Slurm"]["release"] == "22.05.8"
    assert doc["errors"] == []
    (job,) = [j for j in doc["jobs"] if j["job_id"] == job_id]
    assert job["job_state"] == "RUNNING"
    assert job["state_reason"] == "None"
    assert job["name"] == "mt-json"
    assert job["partition"] == "gpu"
    assert job["nodes"] == job["batch_host"]
    assert job["nodes"] in cluster.nodes
    assert job["tres_per_node"] == "gres:gpu:1"
    assert len(job["gres_detail"]) == 1
    assert job["gres_detail"][0].startswith("gpu:fake:1(IDX:")
    assert job["user_name"] == "root"


def test_squeue_json_ignores_filters_and_plain_squeue_rejects_unknown_ids(
    cluster: SlurmCluster,
) -> None:
    running = cluster.sbatch("--wrap", "sleep 30")
    held = cluster.sbatch("--hold", "-p", "debug", "--wrap", "true")
    assert {running, held} <= {j["job_id"] for j in cluster.jobs()}
    # Each filter would drop at least one of the two jobs if squeue --json applied it (ended
    # jobs of earlier tests may be purged meanwhile, so only these two are compared).
    for filters in (["-j", str(running)], ["-j", "99999"], ["-t", "PENDING"], ["-p", "debug"]):
        proc = cluster.run(["squeue", "--json", *filters])
        assert (proc.returncode, proc.stderr) == (0, "")
        assert {running, held} <= {j["job_id"] for j in json.loads(proc.stdout)["jobs"]}, filters
    plain = cluster.run(["squeue", "-h", "-j", "99999"])
    assert (plain.returncode, plain.stdout) == (1, "")
    assert plain.stderr == "slurm_load_jobs error: Invalid job id specified\n"
    shown = cluster.run(["scontrol", "show", "job", "99999"])
    assert (shown.returncode, shown.stderr) == (1, plain.stderr)
    no_json = cluster.run(["scontrol", "show", "job", "--json", str(running)])
    assert no_json.returncode == 1
    assert "unrecognized option '--json'" in no_json.stderr


def test_failed_job_exit_code_is_a_wait_status(cluster: SlurmCluster) -> None:
    job_id = cluster.sbatch("--wrap", "exit 3")
    assert cluster.wait_job(job_id, timeout=30) == "FAILED"
    job = _job(cluster, job_id)
    assert job["job_state"] == "FAILED"
    assert job["state_reason"] == "NonZeroExitCode"
    assert job["exit_code"] == 3 << 8


def test_sacct_fails_because_accounting_is_disabled(cluster: SlurmCluster) -> None:
    job_id = cluster.sbatch("--wrap", "true")
    for argv in (
        ["sacct"],
        ["sacct", "-j", str(job_id), "-o", "JobID,State,ExitCode", "--parsable2", "-n"],
    ):
        proc = cluster.run(argv)
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr == ACCOUNTING_DISABLED


def test_scancel_cancels_a_running_job(cluster: SlurmCluster) -> None:
    started = cluster.work_dir / "cancel-me.started"
    job_id = cluster.sbatch("--wrap", f"touch {started}; sleep 300")
    # RUNNING in squeue only means slurmctld launched it; wait for the script itself.
    deadline = time.monotonic() + 30
    while not started.exists():
        assert time.monotonic() < deadline, cluster.log_tails()
        time.sleep(0.1)
    proc = cluster.run(["scancel", str(job_id)])
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert cluster.wait_job(job_id, timeout=30) == "CANCELLED"
    job = _job(cluster, job_id)
    assert job["job_state"] == "CANCELLED"
    # SIGTERM; SIGKILL (9) when the script was not yet running or outlived KillWait (2 s)
    # on a loaded machine: both are Slurm's own word for "cancelled".
    assert job["exit_code"] in (15, 9)
    unknown = cluster.run(["scancel", "99999"])
    assert (unknown.returncode, unknown.stderr) == (0, "")


def test_held_job_stays_pending_with_reason(cluster: SlurmCluster) -> None:
    job_id = cluster.sbatch("--hold", "--wrap", "true")
    time.sleep(2.5)  # longer than sched_interval and bf_interval (1 s)
    job = _job(cluster, job_id)
    assert job["job_state"] == "PENDING"
    assert job["state_reason"] == "JobHeldUser"
    assert job["nodes"] == ""
    plain = cluster.run(["squeue", "-h", "-j", str(job_id), "-o", "%T %r"], check=True)
    assert plain.stdout == "PENDING JobHeldUser\n"
    cluster.run(["scontrol", "release", str(job_id)], check=True)
    assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"


def test_bad_partition_is_rejected(cluster: SlurmCluster) -> None:
    proc = cluster.run(["sbatch", "--parsable", "-p", "nope", "--wrap", "true"])
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == BAD_PARTITION


def test_impossible_requests(cluster: SlurmCluster) -> None:
    before = {j["job_id"] for j in cluster.jobs()}
    bad_node = cluster.run(["sbatch", "--parsable", "-w", "gpu9", "--wrap", "true"])
    assert (bad_node.returncode, bad_node.stdout) == (1, "")
    assert bad_node.stderr == (
        "sbatch: error: Batch job submission failed: Invalid node name specified\n"
    )
    too_many = cluster.run(["sbatch", "--parsable", "--gres=gpu:3", "--wrap", "true"])
    assert (too_many.returncode, too_many.stdout) == (1, "")
    assert too_many.stderr == (
        "sbatch: error: Batch job submission failed: "
        "Requested node configuration is not available\n"
    )
    # The rejected submission still left a record behind.
    leftovers = [j for j in cluster.jobs() if j["job_id"] not in before]
    assert [(j["job_state"], j["state_reason"]) for j in leftovers] == [
        ("FAILED", "BadConstraints")
    ]
    # More nodes than the partition has is accepted, and then waits forever.
    job_id = cluster.sbatch("--nodes=3", "--wrap", "true")
    time.sleep(2.5)
    job = _job(cluster, job_id)
    assert (job["job_state"], job["state_reason"]) == ("PENDING", "PartitionNodeLimit")


def test_debug_partition_has_the_same_nodes(cluster: SlurmCluster) -> None:
    out = cluster.work_dir / "debug.out"
    job_id = cluster.sbatch(
        "-p", "debug", "--gres=gpu:1", f"--output={out}", "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES"
    )
    assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"
    assert _output(out) == "CVD=0\n"


def _live(pids: list[int]) -> list[int]:
    live = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.append(pid)
        except psutil.NoSuchProcess:
            continue
    return live


@pytest.mark.timeout(120)
def test_a_second_cluster_runs_alongside_and_stop_leaves_nothing(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """Fresh clusters start next to the session's one; stop() kills daemons and jobs."""
    for round_ in range(2):
        second = SlurmCluster.start(tmp_path / f"round{round_}")
        try:
            assert second.ctld_port != slurm_cluster.ctld_port
            assert second.conf_path != slurm_cluster.conf_path
            # A job whose children escape it: proctrack/linuxproc does not kill them.
            marker = second.work_dir / "children-started"
            second.sbatch(
                "--gres=gpu:1",
                "--wrap",
                f"setsid sleep 300 & (sleep 301 &); touch {marker}; sleep 302",
            )
            deadline = time.monotonic() + 30
            while not marker.exists():
                assert time.monotonic() < deadline, second.log_tails()
                time.sleep(0.1)
            pids = second.leftover_pids()
            daemons = second.daemon_pids
            assert set(daemons) <= set(pids)
            assert len(pids) >= len(daemons) + 5  # slurmstepd, script, three sleeps
        finally:
            second.stop()
        assert _live(pids) == []
        assert second.leftover_pids() == []
    # The session's cluster was not disturbed.
    proc = slurm_cluster.run(["sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %t"], check=True)
    assert proc.stdout.split("\n") == ["gpu1 idle", "gpu2 idle", ""]
