"""continuity: handover without a cluster: the spec's rules, the scripts (golden files), when a
handover is due, and that a successor is submitted once (hpc.job.handover, hpc.slurm.handover).

The real handover, on the private Slurm cluster under streaming, is tests/test_slurm_handover.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from test_sbatch import CASES, GOLDEN, SITE, UPDATE

from hpc.chain import chain, describe
from hpc.job.handover import LOOK_S, Handover, end_from_env, lead_s
from hpc.job.plan import JobPlan, warning_drain_s
from hpc.registry import Record, Registry, pending_record
from hpc.slurm.client import SlurmClient
from hpc.slurm.handover import SlurmSuccessors, parse_end_time, submit_environ
from hpc.slurm.handoverjob import HandoverJob
from hpc.slurm.sbatch import render
from hpc.spec import ModelSpec
from hpc.transport import LocalTransport

HANDOVER: dict[str, Any] = {
    **CASES["llamacpp_cpu"],
    "continuity": "handover",
    "resources": {"cpus": 4, "mem_gb": 8, "time_limit_min": 240},
    "slurm": {"partition": "cpu", "signal_grace_s": 300, "handover_margin_s": 120},
}
LOG_DIR = Path("/home/ada/.mt/logs")
PYTHON = "/opt/mt/venv/bin/python"


def _plan(spec: ModelSpec) -> JobPlan:
    return JobPlan(
        spec=spec,
        backend="slurm",
        nonce="0123abcd",
        registry_dir=Path("/home/ada/.mt/registry"),
        engine_host="0.0.0.0",
        drain_s=spec.drain_s,
        warning_drain_s=warning_drain_s(spec.slurm.signal_grace_s),
    )


def _golden(name: str, script: str) -> None:
    path = GOLDEN / f"{name}.sbatch"
    if UPDATE:
        path.write_text(script, encoding="utf-8")
    assert script == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"


def test_handover_script_golden() -> None:
    """The job runs hpc.slurm.handover with what its successor's script needs."""
    spec = ModelSpec.model_validate(HANDOVER)
    script, _ = render(spec, _plan(spec), SITE, log_dir=LOG_DIR, python=PYTHON)
    _golden("llamacpp_handover", script)
    assert "-m hpc.slurm.handover --plan -" in script


def test_successor_script_golden() -> None:
    """The successor is the same job with a new nonce and its predecessor named."""
    spec = ModelSpec.model_validate(HANDOVER)
    job = HandoverJob(plan=_plan(spec), site=SITE, log_dir=LOG_DIR, python=PYTHON)
    successors = SlurmSuccessors(job, SlurmClient(LocalTransport({})))
    script, sbatch_job = successors.script("4567cdef", "1234")
    _golden("llamacpp_handover_successor", script)
    assert sbatch_job.name == "mt-gemma-3-270m-4567cdef"
    assert sbatch_job.log_path("1240") == "/home/ada/.mt/logs/mt-gemma-3-270m-4567cdef-1240.log"


def test_without_continuity_the_script_is_unchanged() -> None:
    spec = ModelSpec.model_validate(CASES["llamacpp_cpu"])
    script, _ = render(spec, _plan(spec), SITE, log_dir=LOG_DIR, python=PYTHON)
    assert "-m hpc.job.wrapper --plan -" in script and "hpc.slurm.handover" not in script


def test_continuity_defaults_to_none_and_is_checked() -> None:
    assert ModelSpec.model_validate(CASES["llamacpp_cpu"]).continuity == "none"
    with pytest.raises(ValidationError, match="continuity"):
        ModelSpec.model_validate({**HANDOVER, "continuity": "migrate"})
    with pytest.raises(ValidationError, match="on_demand"):
        ModelSpec.model_validate({**HANDOVER, "on_demand": {"idle_stop_s": 600}})
    short = {**HANDOVER, "resources": {"time_limit_min": 4}}  # 240 s < 2 * (120 + 15) s
    with pytest.raises(ValidationError, match="time_limit_min"):
        ModelSpec.model_validate(short)
    fixed = {**short, "slurm": {"handover_lead_s": 60}}
    assert ModelSpec.model_validate(fixed).slurm.handover_lead_s == 60


def test_lead_is_time_to_ready_plus_margin_plus_stop() -> None:
    assert lead_s(42.0, 120, None, 15.0) == 177.0
    assert lead_s(42.0, 120, 300.0, 15.0) == 300.0  # handover_lead_s wins


def test_end_time_from_env_and_squeue() -> None:
    assert end_from_env({"SLURM_JOB_END_TIME": "1796000000"}) == 1796000000.0
    assert end_from_env({"SLURM_JOB_END_TIME": "garbage"}) is None
    assert end_from_env({}) is None
    assert parse_end_time("2026-12-05T12:03:00\n") is not None
    assert parse_end_time("N/A") is None and parse_end_time("Unknown") is None


def test_the_successor_is_submitted_without_this_jobs_slurm_variables() -> None:
    env = submit_environ(
        {"SLURM_CONF": "/etc/x.conf", "SLURM_JOB_ID": "7", "SBATCH_PARTITION": "p", "PATH": "/b"}
    )
    assert env == {"SLURM_CONF": "/etc/x.conf", "PATH": "/b"}


@dataclass
class FakeSuccessors:
    """Stands for Slurm's side (hpc.slurm.handover.SlurmSuccessors): a queue in a dict."""

    end: float | None = None
    backend: str = "slurm"
    queue: dict[str, str] = field(default_factory=dict)  # nonce -> job id
    submitted: int = 0
    cancelled: list[str] = field(default_factory=list)

    def end_time(self, job_id: str) -> float | None:
        return self.end

    def find(self, nonce: str) -> str | None:
        return self.queue.get(nonce)

    def submit(self, nonce: str, predecessor: str) -> str:
        self.submitted += 1
        job_id = str(100 + self.submitted)
        self.queue[nonce] = job_id
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


def _registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.ensure()
    return registry


def _record(registry: Registry, job_id: str, state: str = "ready", **fields: object) -> Record:
    record = pending_record(
        "slurm", job_id, "n" + job_id, model="m", engine="llamacpp", log_path=None
    )
    record = record.model_copy(update={"state": state, **fields})
    registry.write(record)
    return record


def _handover(registry: Registry, successors: FakeSuccessors, job_id: str = "10") -> Handover:
    return Handover(successors, registry, job_id, 60.0, lambda _line: None)


def test_the_successor_is_submitted_once(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "10")
    fake = FakeSuccessors()
    first = _handover(registry, fake).submit()
    again = _handover(registry, fake).submit()  # a second signal, or a restarted wrapper
    assert first == again == "101" and fake.submitted == 1
    stored = registry.read("slurm-10")
    assert stored is not None and stored.successor == "101" and stored.successor_nonce


def test_a_submit_lost_before_its_id_was_recorded_is_found_by_its_nonce(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "10", successor_nonce="feed0001")
    fake = FakeSuccessors(queue={"feed0001": "77"})  # sbatch ran; the wrapper died after it
    assert _handover(registry, fake).submit() == "77" and fake.submitted == 0


def test_a_cancelled_job_submits_nothing_and_cancels_a_late_successor(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "10", state="gone")
    fake = FakeSuccessors()
    assert _handover(registry, fake).submit() is None and fake.submitted == 0

    class CancelledMeanwhile(FakeSuccessors):
        """`mt cancel` ends the record while sbatch runs."""

        def submit(self, nonce: str, predecessor: str) -> str:
            registry.update("slurm-11", state="gone")
            return super().submit(nonce, predecessor)

    _record(registry, "11")
    late = CancelledMeanwhile()
    assert _handover(registry, late, "11").submit() is None
    assert late.cancelled == ["101"]
    stored = registry.read("slurm-11")
    assert stored is not None and stored.successor is None


def test_due_at_the_lead_or_the_warning_and_only_after_the_predecessor(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "9", state="draining")
    _record(registry, "10", predecessor="9")
    handover = _handover(registry, FakeSuccessors(end=1000.0))
    assert handover.schedule({}) == 940.0
    assert not handover.due(warned=False, now=939.0)
    assert not handover.due(warned=True, now=950.0)  # job 9 still drains: never three jobs
    registry.update("slurm-9", state="gone")
    assert handover.due(warned=False, now=941.0)
    assert handover.due(warned=True, now=100.0)  # the warning came first
    unknown = _handover(registry, FakeSuccessors(end=None))
    assert unknown.schedule({}) is None
    assert not unknown.due(warned=False) and unknown.due(warned=True)


def test_chain_and_what_status_says(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "9", state="gone", successor="10", handover_at=1_800_000_000.0)
    middle = _record(registry, "10", predecessor="9", successor="11")
    links = chain(registry, middle)
    assert [(link.job_id, link.record is not None) for link in links] == [
        ("9", True),
        ("10", True),
        ("11", False),  # submitted, its record not written yet
    ]
    head = registry.read("slurm-9")
    assert head is not None
    assert str(describe(head)).startswith("handover → job 10 at ")
    assert describe(middle) == "took over from job 9; handover → job 11"
    lone = _record(registry, "20")
    assert describe(lone) is None


def _step_until(handover: Handover, budget_s: float, looks: int) -> bool:
    """``handover.step`` until it says drain, at most ``looks`` looks apart by LOOK_S."""
    for _ in range(looks):
        if handover.step(budget_s):
            return True
        time.sleep(LOOK_S)
    return False


def test_step_drains_once_the_successor_is_ready(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "10")
    fake = FakeSuccessors(end=time.time() + 3600)
    handover = _handover(registry, fake)
    handover.start(5.0, 60.0, None, 15.0, {})
    assert handover.lead_s == 80.0 and handover.end_deadline is not None
    assert not handover.step(100.0) and fake.submitted == 0  # not due for an hour
    handover.warn()  # the warning starts it
    assert not _step_until(handover, 100.0, 3)
    assert fake.submitted == 1 and handover.successor == "101"
    assert handover.reason() == "time limit near, no successor ready"
    _record(registry, "101", predecessor="10")  # the successor is ready
    assert _step_until(handover, 100.0, 12)  # after SWITCH_SETTLE_S
    assert handover.reason() == "handed over to job 101" and fake.submitted == 1


def test_step_without_a_successor_drains_halfway_through_the_warning(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    _record(registry, "10")
    handover = _handover(registry, FakeSuccessors(end=None))
    assert handover.start(5.0, 60.0, None, 15.0, {}) is None
    handover.warn()
    handover.over = True  # its successor failed
    assert handover.warning_deadline(2.0) is not None
    assert _step_until(handover, 2.0, 6)  # 1 s after the warning
