"""The pyslurm adapter and the CLI client, held to one contract on the real private cluster.

pyslurm 25.11 cannot be built here (Debian has Slurm 22.05), so the adapter runs against
``tests/fake_pyslurm``: pyslurm's names and signatures, with every call made by the real Slurm
tools against the test cluster. Both implementations submit the same scripts (one of them
rendered by hpc.slurm.sbatch) to the same slurmctld, and the assertions read what Slurm made of them
in ``squeue --json``. The fake is on ``sys.path`` only inside the tests that ask for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from slurmcluster import SlurmCluster

from hpc.backends.slurm import SlurmBackend
from hpc.errors import SlurmError
from hpc.job.plan import JobPlan
from hpc.jobs import JobService
from hpc.registry import Registry, new_nonce, record_key
from hpc.site import Site, SiteConfig, SlurmSite
from hpc.slurm.client import PENDING_STATES, RUNNING_STATES, SlurmAPI, SlurmClient, SlurmJob
from hpc.slurm.pyslurm import (
    PyslurmAPI,
    pyslurm_api_for,
    pyslurm_api_if_usable,
    sbatch_options,
    signal_name,
    submit_description,
)
from hpc.slurm.sbatch import SbatchJob, render
from hpc.spec import ModelSpec
from hpc.transport import CommandTimeout, LocalTransport

FAKE_PYSLURM = Path(__file__).parent / "fake_pyslurm"
HOSTILE_DIR = "logs with 'quotes', \"double\" and ; echo INJECTED"
TINY: dict[str, Any] = {
    "name": "tiny",
    "engine": "llamacpp",
    "weights": {"source": "/models/tiny.gguf"},
    "resources": {"cpus": 1, "mem_gb": 0.5, "time_limit_min": 7},
    "slurm": {"signal_grace_s": 45},
}


# ---------------------------------------------------------------- fixtures


def _forget_pyslurm() -> None:
    for name in [n for n in sys.modules if n == "pyslurm" or n.startswith("pyslurm.")]:
        del sys.modules[name]


@pytest.fixture
def no_pyslurm() -> Iterator[None]:
    """No pyslurm imported before or after the test."""
    _forget_pyslurm()
    yield
    _forget_pyslurm()


@pytest.fixture
def fake_pyslurm(no_pyslurm: None, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``import pyslurm`` finds the fake (pyslurm 25.11's API, backed by the real Slurm tools)."""
    monkeypatch.syspath_prepend(str(FAKE_PYSLURM))
    module = importlib.import_module("pyslurm")
    assert Path(module.__file__ or "").is_relative_to(FAKE_PYSLURM)
    return module


@pytest.fixture(params=["cli", "pyslurm"])
def api(request: pytest.FixtureRequest, cluster: SlurmCluster) -> SlurmAPI:
    """Each implementation of SlurmAPI in turn, both talking to the private cluster."""
    if request.param == "cli":
        return SlurmClient(LocalTransport(), timeout_s=30)
    return PyslurmAPI(request.getfixturevalue("fake_pyslurm"))


# ---------------------------------------------------------------- helpers


def stand_in_python(tmp_path: Path) -> Path:
    """Stands in for the Python with ModelTainer: holds the job until signalled or cancelled.

    The script execs it as ``<python> -m hpc.job.wrapper --plan -``; once its traps are set it
    leaves ``<path>.ready`` (squeue says RUNNING before the script runs, so a signal sent then
    could beat the trap); on USR1 it leaves ``<path>.usr1`` and exits 0.
    """
    # No space in its name: proctrack/linuxproc (22.05) reads /proc/<pid>/stat with sscanf and
    # loses a process whose command name has one, so scancel could never kill it.
    path = tmp_path / "stand-in-python"
    path.write_text(
        "#!/bin/sh\n"
        "trap 'echo USR1 > \"$0.usr1\"; kill $!; exit 0' USR1\n"
        "trap 'kill $!; exit 143' TERM\n"
        "sleep 300 &\n"
        'echo ready > "$0.ready"\n'
        "wait\n",
        encoding="utf-8",
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def render_tiny(
    tmp_path: Path,
    *,
    python: Path | str = "/opt/mt/bin/python",
    nonce: str = "0123abcd",
    **spec: Any,
) -> tuple[str, SbatchJob]:
    """One of our own scripts, as hpc.slurm.sbatch renders it, logging into a hostile directory."""
    model = ModelSpec.model_validate({**TINY, **spec})
    plan = JobPlan(
        spec=model,
        backend="slurm",
        nonce=nonce,
        registry_dir=tmp_path / "registry",
        engine_host="0.0.0.0",
    )
    log_dir = tmp_path / HOSTILE_DIR
    log_dir.mkdir(exist_ok=True)
    return render(model, plan, SlurmSite(), log_dir=log_dir, python=str(python))


def squeue_record(cluster: SlurmCluster, job_id: str) -> dict[str, Any]:
    """The job as ``squeue --json`` shows it: what Slurm made of the submission."""
    return next(j for j in cluster.jobs() if str(j["job_id"]) == job_id)


def wait_running(api: SlurmAPI, job_id: str, timeout: float = 30) -> SlurmJob:
    deadline = time.monotonic() + timeout
    while True:
        job = api.jobs([job_id])[job_id]
        if job.state == "RUNNING":
            return job
        assert job.state in PENDING_STATES | RUNNING_STATES, job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state}"
        time.sleep(0.2)


def simple_script(*directives: str) -> str:
    lines = [f"#SBATCH {d}" for d in directives]
    return "\n".join(["#!/bin/sh", *lines, "sleep 300", ""])


# ---------------------------------------------------------------- one contract, two clients


@pytest.mark.slurm
def test_submit_see_find_cancel(api: SlurmAPI, cluster: SlurmCluster, tmp_path: Path) -> None:
    nonce = new_nonce()  # squeue keeps the other client's cancelled job for a while
    script, job = render_tiny(tmp_path, python=stand_in_python(tmp_path), nonce=nonce)
    job_id = api.sbatch(script)
    assert job_id.isdigit()

    seen = api.jobs([job_id])[job_id]
    assert seen.state in PENDING_STATES | RUNNING_STATES
    assert (seen.name, seen.comment) == (job.name, f"mt:{nonce}")
    found = api.find_by_comment(f"mt:{nonce}")
    assert found is not None and found.job_id == job_id
    assert api.find_by_comment("mt:nobody") is None
    assert set(api.jobs([job_id, "999999"])) == {job_id}
    assert api.jobs([]) == {}

    running = wait_running(api, job_id)
    assert running.nodes in ("gpu1", "gpu2")
    # What Slurm made of the script's directives, however they reached it.
    record = squeue_record(cluster, job_id)
    assert record["time_limit"] == 7
    assert record["memory_per_node"] == 512
    assert (record["tasks"], record["cpus"], record["node_count"]) == (1, 1, 1)
    assert record["requeue"] is False
    assert record["standard_output"] == str(tmp_path / HOSTILE_DIR / "%x-%j.log")
    # Slurm creates the output file as the batch step starts, which can lag RUNNING.
    log_file = Path(job.log_path(job_id))
    for _ in range(300):
        if log_file.exists():
            break
        time.sleep(0.2)
    assert log_file.exists()

    api.scancel(job_id)
    assert cluster.wait_job(int(job_id), timeout=30) == "CANCELLED"
    after = api.jobs([job_id]).get(job_id)
    assert after is None or after.state == "CANCELLED"


@pytest.mark.slurm
def test_signal_reaches_only_the_batch_shell(
    api: SlurmAPI, cluster: SlurmCluster, tmp_path: Path
) -> None:
    python = stand_in_python(tmp_path)
    script, _ = render_tiny(tmp_path, python=python)
    job_id = api.sbatch(script)
    wait_running(api, job_id)
    ready = Path(f"{python}.ready")
    deadline = time.monotonic() + 30
    while not ready.exists():  # RUNNING in squeue does not mean the script's trap is set
        assert time.monotonic() < deadline, "the batch script never started"
        time.sleep(0.1)

    api.scancel(job_id, signal="USR1", batch_only=True)
    mark = Path(f"{python}.usr1")
    deadline = time.monotonic() + 15
    while not mark.exists():
        assert time.monotonic() < deadline, "the batch shell never got USR1"
        time.sleep(0.2)
    assert cluster.wait_job(int(job_id), timeout=30) == "COMPLETED"  # it exited 0 on USR1


@pytest.mark.slurm
def test_held_job_shows_why(api: SlurmAPI, cluster: SlurmCluster) -> None:
    job_id = api.sbatch(simple_script("--hold", "--job-name=held", "--comment=mt:held"))
    held = api.jobs([job_id])[job_id]
    assert (held.state, held.reason) == ("PENDING", "JobHeldUser")
    assert (held.name, held.comment, held.nodes) == ("held", "mt:held", "")


@pytest.mark.slurm
def test_bad_partition_fails_with_the_sinfo_hint(api: SlurmAPI, cluster: SlurmCluster) -> None:
    with pytest.raises(SlurmError) as info:
        api.sbatch(simple_script("--partition=nope", "--job-name=lost"))
    assert "invalid partition" in info.value.message.lower()
    assert info.value.hint is not None and "`sinfo -s`" in info.value.hint
    assert not [j for j in cluster.jobs() if j["name"] == "lost"]


@pytest.mark.slurm
def test_no_accounting_is_none(api: SlurmAPI, cluster: SlurmCluster) -> None:
    job_id = api.sbatch(simple_script("--hold"))
    assert api.accounting([job_id]) is None  # AccountingStorageType=accounting_storage/none
    assert api.accounting([]) == {}


@pytest.mark.slurm
def test_unknown_job_cannot_be_signalled(api: SlurmAPI, cluster: SlurmCluster) -> None:
    with pytest.raises(SlurmError, match="Invalid job id specified"):
        api.scancel("999999", signal="USR1", batch_only=True)


# ---------------------------------------------------------------- pyslurm only


@pytest.mark.slurm
def test_socket_timeout_is_unknown_not_failed(
    cluster: SlurmCluster, fake_pyslurm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake's knob: its Slurm command does not answer in time, as libslurm's socket would not.
    monkeypatch.setattr(sys.modules["pyslurm._rpc"], "TIMEOUT_S", 0.001)
    with pytest.raises(CommandTimeout):
        PyslurmAPI(fake_pyslurm).jobs()


@pytest.mark.slurm
def test_like_libslurm_the_fake_reads_no_directives(
    cluster: SlurmCluster, fake_pyslurm: ModuleType
) -> None:
    """Why the adapter passes every option itself: slurm_submit_batch_job ignores #SBATCH."""
    script = simple_script("--job-name=from-directive", "--comment=from-directive", "--hold")
    job_id = fake_pyslurm.JobSubmitDescription(script=script, name="given").submit()
    assert isinstance(job_id, int)
    record = squeue_record(cluster, str(job_id))
    assert (record["name"], record["comment"]) == ("given", "")
    assert record["state_reason"] != "JobHeldUser"


@pytest.mark.slurm
def test_backend_uses_pyslurm_only_when_the_site_opts_in_and_versions_match(
    cluster: SlurmCluster,
    fake_pyslurm: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    python = stand_in_python(tmp_path)

    def backend(**slurm: Any) -> SlurmBackend:
        config = SiteConfig(slurm=SlurmSite(python=str(python), **slurm))
        return SlurmBackend(Site(config, tmp_path / "mt-home"))

    assert isinstance(backend().client, SlurmClient)  # not asked for
    assert fake_pyslurm.__version__ == "25.11.0"
    assert isinstance(backend(use_pyslurm=True).client, SlurmClient)  # built for another Slurm

    monkeypatch.setattr(fake_pyslurm, "__version__", "22.5.3")  # as pyslurm spells 22.05
    scheduler = backend(use_pyslurm=True)
    assert isinstance(scheduler.client, PyslurmAPI)
    chosen = JobService(scheduler.site, scheduler, cancel_wait_s=30)

    spec = ModelSpec.model_validate(TINY)
    handle = chosen.submit(spec)
    assert squeue_record(cluster, handle.job_id)["comment"] == f"mt:{handle.nonce}"
    status = chosen.status([handle])[handle.job_id]
    assert status.state in ("pending", "running")
    chosen.cancel(handle)
    record = Registry(chosen.site.registry_dir).read(record_key("slurm", handle.job_id))
    assert record is not None and record.state == "gone"
    assert cluster.wait_job(int(handle.job_id), timeout=30) == "CANCELLED"


@pytest.mark.slurm
def test_if_usable_compares_major_minor(
    cluster: SlurmCluster, fake_pyslurm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = SlurmClient(LocalTransport(), timeout_s=30)
    version = client.run(["sinfo", "--version"]).stdout
    assert "22.05" in version
    assert pyslurm_api_if_usable(version) is None  # the fake says 25.11.0
    assert pyslurm_api_for(client) is None
    monkeypatch.setattr(fake_pyslurm, "__version__", "22.5.3")
    assert isinstance(pyslurm_api_if_usable(version), PyslurmAPI)
    assert isinstance(pyslurm_api_for(client), PyslurmAPI)
    assert pyslurm_api_if_usable("slurm 22.11.4") is None
    assert pyslurm_api_if_usable("no version here") is None


def test_if_usable_without_pyslurm(no_pyslurm: None) -> None:
    assert importlib.util.find_spec("pyslurm") is None  # the fake is not on sys.path here
    assert pyslurm_api_if_usable("slurm-wlm 22.05.8") is None


# ---------------------------------------------------------------- reading #SBATCH lines


def test_our_directives_become_explicit_attributes(tmp_path: Path) -> None:
    # Two nodes: vLLM (llama.cpp serves from one node and is refused with nodes > 1).
    script, job = render_tiny(
        tmp_path,
        engine="vllm",
        weights={"source": "org/tiny"},
        resources={
            "gpus": 2,  # the job's total: one per node
            "gpu_type": "fake",
            "cpus": 2,
            "mem_gb": 1.5,
            "nodes": 2,
            "time_limit_min": 7,
        },
        slurm={"requeue": True, "signal_grace_s": 45, "extra_directives": ["--exclusive"]},
    )
    desc = submit_description(script)
    assert desc.pop("script") == script
    assert desc == {
        "name": job.name,
        "comment": "mt:0123abcd",
        "standard_output": str(tmp_path / HOSTILE_DIR / "%x-%j.log"),
        "log_files_open_mode": "append",
        "nodes": "2",
        "ntasks_per_node": 1,
        "ntasks": 2,  # sbatch's nodes x ntasks-per-node; pyslurm would default to 1
        "cpus_per_task": 2,
        "memory_per_node": "1536M",
        "time_limit": 7,  # an int: pyslurm cannot store a digit string
        "signal": {
            "signal": "SIGUSR1",
            "time": 45,
            "batch_only": True,
            "allow_reservation_overlap": False,
        },
        "is_requeueable": True,
        "gres_per_node": "gpu:fake:1",
        "resource_sharing": "no",
    }


def test_directives_are_read_as_sbatch_reads_them() -> None:
    script = (
        "#!/bin/bash\n"
        "#SBATCH --job-name='a b' --time 1-00:00:00  # trailing comment\n"
        "# a comment does not end the directives\n"
        "\n"
        "#SBATCH --partition=debug\n"
        "echo first command\n"
        "#SBATCH --account=ignored-after-the-first-command\n"
    )
    assert sbatch_options(script) == [
        ("--job-name", "a b"),
        ("--time", "1-00:00:00"),
        ("--partition", "debug"),
    ]
    desc = submit_description(script)
    assert (desc["time_limit"], desc["partitions"]) == ("1-00:00:00", "debug")
    assert "account" not in desc


@pytest.mark.parametrize(
    "directive", ["--spread-job", "-J short", "--signal=X:USR1@10", "--cpus-per-task=two"]
)
def test_directives_it_cannot_pass_fail_loudly(directive: str) -> None:
    with pytest.raises(SlurmError) as info:
        submit_description(simple_script(directive))
    assert info.value.argv == ["pyslurm"]


def test_signal_names_as_pyslurm_takes_them() -> None:
    assert signal_name("USR1") == "SIGUSR1"
    assert signal_name("sigterm") == "SIGTERM"
    assert signal_name("10") == 10
    with pytest.raises(SlurmError, match="unknown signal"):
        signal_name("NOPE")
