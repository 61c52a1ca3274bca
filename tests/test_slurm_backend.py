"""The Slurm backend on the real private cluster (two nodes, four fake GPUs) with the real engine.

Every job here runs the real job wrapper and the real llama.cpp server with the Gemma model
on a Slurm node; only the GPUs are fake (character devices Slurm really allocates).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from mtcli import GEMMA, gemma_models_yaml, mt, owner_key, running_gateway
from slurmcluster import SlurmCluster

from hpc.backends.slurm import SlurmBackend
from hpc.errors import BackendError
from hpc.jobs import JobService
from hpc.registry import Record, Registry, new_api_key
from hpc.site import Site, load_site
from hpc.slurm.client import SlurmClient
from hpc.transport import CommandResult, CommandTimeout, LocalTransport

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(300)]


@pytest.fixture
def models(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


def add_model(models: Path, name: str, **overrides: Any) -> None:
    """Append a variant of the Gemma model with other settings (JSON is valid YAML)."""
    base = {
        "name": name,
        "engine": "llamacpp",
        "weights": {"source": _gguf(models)},
        "engine_args": ["--ctx-size", "512"],
        "startup_timeout_s": 120,
        "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 30},
    }
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    with models.open("a", encoding="utf-8") as f:
        f.write(f"  - {json.dumps(base)}\n")


def _gguf(models: Path) -> str:
    line = next(li for li in models.read_text().splitlines() if "weights:" in li)
    return str(json.loads(line.split("source:", 1)[1].strip().rstrip("}")))


def registry() -> Registry:
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


def submit_ready(model: str, *extra: str) -> dict[str, Any]:
    out = mt("submit", model, "--backend", "slurm", "--wait", "--json", "--timeout", "150", *extra)
    record: dict[str, Any] = json.loads(out.stdout)
    assert record["state"] == "ready", record
    return record


def engine_env(record: dict[str, Any]) -> dict[str, str]:
    stored = registry().find(record["key"])
    assert stored is not None and stored.engine_pid is not None
    return psutil.Process(stored.engine_pid).environ()


def test_submit_route_stream_cancel(cluster: SlurmCluster, models: Path) -> None:
    import openai

    record = submit_ready(GEMMA)
    assert record["node"] in ("gpu1", "gpu2")
    assert record["backend"] == "slurm" and record["port"]
    assert record["job_id"].isdigit()
    squeue = {str(j["job_id"]): j for j in cluster.jobs()}
    assert squeue[record["job_id"]]["job_state"] == "RUNNING"

    with running_gateway() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key())
        deadline = time.monotonic() + 10
        while GEMMA not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        stream = client.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.strip()

    stored = registry().find(record["key"])
    assert stored is not None and stored.engine_pid is not None
    engine = psutil.Process(stored.engine_pid)
    cancelled = json.loads(mt("cancel", record["key"], "--json").stdout)
    assert cancelled["state"] == "gone"
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert cluster.wait_job(int(record["job_id"]), timeout=30) in (None, "CANCELLED", "COMPLETED")


def test_gpu_selection(cluster: SlurmCluster, models: Path) -> None:
    """Slurm's GPU grant reaches the engine: 2 GPUs → 0,1; two 1-GPU jobs on one node differ."""
    add_model(
        models,
        "gemma-2gpu",
        resources={"gpus": 2, "gpu_type": "fake"},
        slurm={"extra_directives": ["--nodelist=gpu2"]},
    )
    add_model(
        models, "gemma-1gpu", resources={"gpus": 1}, slurm={"extra_directives": ["--nodelist=gpu1"]}
    )
    two = submit_ready("gemma-2gpu")
    assert two["node"] == "gpu2"
    assert engine_env(two)["CUDA_VISIBLE_DEVICES"] == "0,1"

    first = submit_ready("gemma-1gpu")
    second = submit_ready("gemma-1gpu")
    assert first["node"] == second["node"] == "gpu1"
    env1, env2 = engine_env(first), engine_env(second)
    assert env1["CUDA_VISIBLE_DEVICES"] and env2["CUDA_VISIBLE_DEVICES"]
    assert env1["SLURM_JOB_GPUS"] != env2["SLURM_JOB_GPUS"]
    for record in (two, first, second):
        mt("cancel", record["key"])


def test_bad_partition_is_a_clear_error_and_leaves_no_record(
    cluster: SlurmCluster, models: Path
) -> None:
    add_model(models, "gemma-badpart", slurm={"partition": "nosuchpartition"})
    done = mt("submit", "gemma-badpart", "--backend", "slurm", check=False)
    assert done.returncode == 1
    assert "error: sbatch failed:" in done.stderr
    assert "partition" in done.stderr.lower()
    assert "hint: `sinfo -s`" in done.stderr
    assert registry().records() == []
    queued = [j for j in cluster.jobs() if str(j["name"]).startswith("mt-gemma-badpart-")]
    assert [j["job_state"] for j in queued] in ([], ["FAILED"])


def test_never_healthy_is_failed_with_log_tail(cluster: SlurmCluster, models: Path) -> None:
    # The engine is told to listen on a loopback port of its own rather than on the socket
    # the wrapper probes (a later --host beats the wrapper's): a real engine that loads,
    # logs, and never becomes healthy.
    add_model(
        models,
        "gemma-slow",
        startup_timeout_s=8,
        engine_args=["--host", "127.0.0.1", "--port", "0"],
    )
    done = mt("submit", "gemma-slow", "--backend", "slurm", "--wait", check=False)
    assert done.returncode == 1
    assert "not healthy within startup_timeout_s=8" in done.stderr
    assert "last log lines:" in done.stderr
    [record] = registry().records()
    assert record.state == "failed" and record.log_tail
    assert cluster.wait_job(int(record.job_id), timeout=60) in (None, "COMPLETED", "FAILED")


def test_held_job_shows_pending_reason_and_is_not_routed(
    cluster: SlurmCluster, models: Path
) -> None:
    add_model(models, "gemma-held", slurm={"extra_directives": ["--hold"]})
    done = mt("submit", "gemma-held", "--backend", "slurm", "--wait", "--timeout", "3", check=False)
    assert done.returncode == 1
    assert "pending (JobHeldUser)" in done.stderr
    assert "not ready after 3s" in done.stderr
    [row] = json.loads(mt("status", "--json").stdout)
    assert row["state"] == "pending"
    assert row["scheduler"] == {"state": "pending", "reason": "JobHeldUser"}
    assert json.loads(mt("models", "--json").stdout)[-1]["endpoints"] == []
    assert json.loads(mt("cancel", row["key"], "--json").stdout)["state"] == "gone"


def test_requeue_registers_a_new_generation(cluster: SlurmCluster, models: Path) -> None:
    add_model(models, "gemma-requeue", slurm={"requeue": True})
    first = submit_ready("gemma-requeue")
    cluster.run(["scontrol", "requeue", first["job_id"]])
    key = first["key"]
    deadline = time.monotonic() + 240
    record: Record | None = None
    while time.monotonic() < deadline:
        record = registry().read(key)
        if record is not None and record.generation == 1 and record.state == "ready":
            break
        time.sleep(1)
    assert record is not None and record.generation == 1 and record.state == "ready", record
    assert record.base_url != first["base_url"] or record.pid != first["pid"]
    mt("cancel", key)


class _SbatchTimesOut:
    """The real transport, except that sbatch 'times out' after Slurm has queued the job."""

    def __init__(self) -> None:
        self.inner = LocalTransport()
        self.sbatch_calls = 0

    def run(self, argv: list[str], *, stdin: str | None = None, timeout_s: float) -> CommandResult:
        result = self.inner.run(argv, stdin=stdin, timeout_s=timeout_s)
        if argv[0] == "sbatch":
            self.sbatch_calls += 1
            raise CommandTimeout(argv, timeout_s)
        return result


def test_sbatch_timeout_finds_the_job_by_nonce(cluster: SlurmCluster, models: Path) -> None:
    site = load_site(None)
    transport = _SbatchTimesOut()
    backend = JobService(site, SlurmBackend(site, client=SlurmClient(transport, timeout_s=30)))
    spec = next(m for m in __import__("hpc.configfile").configfile.load_models(models).models)
    handle = backend.submit(spec)
    assert transport.sbatch_calls == 1
    mine = [j for j in cluster.jobs() if j.get("comment") == f"mt:{handle.nonce}"]
    assert [str(j["job_id"]) for j in mine] == [handle.job_id]
    record = registry().find(handle.job_id)
    assert record is not None and record.nonce == handle.nonce
    backend.cancel(handle)


_LOST_CONTROLLER = (
    "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation\n"
)


class _SbatchLosesTheController:
    """The real transport, except that sbatch then fails as it does when it lost the
    controller mid-call: exit 1 and Slurm's transport error, after the job was queued
    (``queue=True``) or without it."""

    def __init__(self, *, queue: bool) -> None:
        self.inner = LocalTransport()
        self.queue = queue
        self.sbatch_calls = 0

    def run(self, argv: list[str], *, stdin: str | None = None, timeout_s: float) -> CommandResult:
        if argv[0] != "sbatch":
            return self.inner.run(argv, stdin=stdin, timeout_s=timeout_s)
        self.sbatch_calls += 1
        if self.queue:
            self.inner.run(argv, stdin=stdin, timeout_s=timeout_s)
        return CommandResult(argv, 1, "", _LOST_CONTROLLER)


def _service(transport: object, *, lookup_s: float | None = None) -> JobService:
    site = load_site(None)
    if lookup_s is not None:
        slurm = site.config.slurm.model_copy(update={"submit_lookup_s": lookup_s})
        site = Site(site.config.model_copy(update={"slurm": slurm}), site.home)
    client = SlurmClient(transport, timeout_s=30)  # type: ignore[arg-type]
    return JobService(site, SlurmBackend(site, client=client))


def test_sbatch_that_lost_the_controller_after_queueing_finds_the_job(
    cluster: SlurmCluster, models: Path
) -> None:
    transport = _SbatchLosesTheController(queue=True)
    jobs = _service(transport)
    spec = next(m for m in __import__("hpc.configfile").configfile.load_models(models).models)
    handle = jobs.submit(spec)
    assert transport.sbatch_calls == 1  # looked up, not resubmitted
    mine = [j for j in cluster.jobs() if j.get("comment") == f"mt:{handle.nonce}"]
    assert [str(j["job_id"]) for j in mine] == [handle.job_id]
    record = registry().find(handle.job_id)
    assert record is not None and record.nonce == handle.nonce
    jobs.cancel(handle)


def test_sbatch_that_lost_the_controller_before_queueing_submitted_nothing(
    cluster: SlurmCluster, models: Path
) -> None:
    transport = _SbatchLosesTheController(queue=False)
    jobs = _service(transport, lookup_s=3)
    spec = next(m for m in __import__("hpc.configfile").configfile.load_models(models).models)
    before = {str(j["job_id"]) for j in cluster.jobs()}
    with pytest.raises(BackendError) as caught:
        jobs.submit(spec)
    message = caught.value.message
    assert "Socket timed out on send/recv operation" in message
    assert "within 3s: nothing was submitted" in message and caught.value.hint
    assert transport.sbatch_calls == 1
    # No new job (an earlier test's job may end and leave the list meanwhile: a subset).
    assert {str(j["job_id"]) for j in cluster.jobs()} <= before
    assert registry().records() == []  # a failed submit leaves no record behind


def test_the_lookup_window_follows_the_controllers_message_timeout(cluster: SlurmCluster) -> None:
    backend = SlurmBackend(load_site(None), client=SlurmClient(LocalTransport(), timeout_s=30))
    config = LocalTransport().run(["scontrol", "show", "config"], timeout_s=30).stdout
    line = next(li for li in config.splitlines() if li.startswith("MessageTimeout"))
    seconds = float(line.split("=", 1)[1].split()[0])
    assert backend.client.message_timeout_s() == seconds
    assert backend.lookup_window_s() == max(30.0, 2 * seconds)


def test_a_job_still_pending_at_its_queue_timeout_is_cancelled_and_leaves_nothing(
    cluster: SlurmCluster, models: Path
) -> None:
    add_model(models, "gemma-gpu", resources={"gpus": 1})
    # Every GPU of both nodes is taken: the model's job can only wait (Resources).
    blocker = cluster.sbatch("--nodes=2", "--gres=gpu:2", "--mem=100", "--wrap", "sleep 300")
    try:
        while cluster.job_state(blocker) != "RUNNING":
            time.sleep(0.2)
        before = {str(j["job_id"]) for j in cluster.jobs()}
        done = mt("submit", "gemma-gpu", "--backend", "slurm", "--queue-timeout", "4", check=False)
        assert done.returncode == 1, done.stderr
        assert "still pending after 4s (Resources): cancelled" in done.stderr
        assert "hint:" in done.stderr
        mine = [j for j in cluster.jobs() if str(j["job_id"]) not in before]
        assert len(mine) == 1 and mine[0].get("comment", "").startswith("mt:")
        assert cluster.wait_job(int(mine[0]["job_id"]), timeout=30) in (None, "CANCELLED")
        assert registry().records() == []  # nothing is left of it
    finally:
        cluster.run(["scancel", str(blocker)], timeout=30)


def test_record_of_a_vanished_job_is_marked_stale(cluster: SlurmCluster, models: Path) -> None:
    ghost = Record(
        backend="slurm",
        job_id="999999",
        nonce="deadbeef",
        model=GEMMA,
        engine="llamacpp",
        state="ready",
        base_url="http://127.0.0.1:1/v1",
        api_key=new_api_key(),  # type: ignore[arg-type]
    )
    registry().write(ghost)
    [row] = json.loads(mt("status", "--json", "--all").stdout)
    assert row["state"] == "gone"
    assert row["reason"] == "stale: scheduler says missing"


def test_render_then_sbatch_by_hand_registers(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A script written by `mt render` and sbatch'd by hand registers its endpoint; paths with
    spaces and quotes survive the #SBATCH --output line on the real sbatch."""
    home = tmp_path / "mt home 'quoted'"
    monkeypatch.setenv("MT_HOME", str(home))
    models = gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)
    monkeypatch.setenv("MT_MODELS", str(models))
    home.mkdir(mode=0o700)  # private, as mt makes it
    (home / "logs").mkdir()
    script = tmp_path / "gemma.sbatch"
    mt("render", GEMMA, "-o", str(script))
    job_id = cluster.sbatch(str(script))
    reg = Registry(home / "registry")
    deadline = time.monotonic() + 120
    record = None
    while time.monotonic() < deadline:
        record = reg.find(str(job_id))
        if record is not None and record.state in ("ready", "failed"):
            break
        time.sleep(0.5)
    assert record is not None and record.state == "ready", record
    logs = list((home / "logs").glob(f"*-{job_id}.log"))
    assert len(logs) == 1 and "record slurm-" in logs[0].read_text()
    assert json.loads(mt("cancel", str(job_id), "--json").stdout)["state"] == "gone"


def test_time_limit_warning_drains_and_ends_the_job(cluster: SlurmCluster, models: Path) -> None:
    """--signal=B:USR1@grace makes Slurm send USR1 to the batch shell before the time limit;
    Slurm delivers that same signal here, now, instead of in `time_limit - grace` seconds."""
    record = submit_ready(GEMMA)
    stored = registry().find(record["key"])
    assert stored is not None and stored.engine_pid is not None
    engine = psutil.Process(stored.engine_pid)
    SlurmClient(LocalTransport()).scancel(record["job_id"], signal="USR1", batch_only=True)
    deadline = time.monotonic() + 60
    while (current := registry().find(record["key"])) is not None and current.state != "gone":
        assert time.monotonic() < deadline, current
        time.sleep(0.2)
    assert current is not None and current.reason == "stopped by SIGUSR1"
    assert cluster.wait_job(int(record["job_id"]), timeout=60) in (None, "COMPLETED")
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


def test_unsatisfiable_gpu_request_is_rejected_with_a_hint(
    cluster: SlurmCluster, models: Path
) -> None:
    add_model(models, "gemma-8gpu", resources={"gpus": 8})
    done = mt("submit", "gemma-8gpu", "--backend", "slurm", check=False)
    assert done.returncode == 1
    assert "Requested node configuration is not available" in done.stderr
    assert "hint: " in done.stderr and "sinfo" in done.stderr
    assert registry().records() == []
