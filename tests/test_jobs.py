"""The job service's one rule for records whose job ended without finishing them (pure)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from hpc.backends import JobStatus
from hpc.reconcile import reconcile
from hpc.registry import Record, State


def _record(state: State, **extra: object) -> Record:
    return Record.model_validate(
        {
            "backend": "slurm",
            "job_id": "42",
            "nonce": "ab12cd34",
            "model": "m",
            "engine": "vllm",
            "state": state,
            "api_key": SecretStr("mtj-key"),
            **extra,
        }
    )


@pytest.mark.parametrize("state", ["gone", "failed"])
def test_a_final_record_stays_as_it_is(state: State) -> None:
    record = _record(state)
    assert reconcile(record, JobStatus("missing")) is record
    assert reconcile(record, JobStatus("running", serving="ready")) is record


@pytest.mark.parametrize("scheduler", ["pending", "running", "unknown"])
def test_a_job_still_there_leaves_its_record_alone(scheduler: str) -> None:
    record = _record("starting")
    assert reconcile(record, JobStatus(scheduler)) is record  # type: ignore[arg-type]


@pytest.mark.parametrize("state", ["starting", "ready", "draining", "gone", "failed"])
def test_a_job_that_ran_and_is_pending_again_is_the_next_runs_pending_record(
    state: State,
) -> None:
    record = _record(state, engine_pid=1234, base_url="http://n1:8000/v1", updated_at=100.0)
    again = reconcile(record, JobStatus("pending", "BeginTime"), asked_at=101.0)
    assert (again.state, again.generation, again.engine_pid, again.base_url) == (
        "pending",
        1,
        None,
        None,
    )
    assert again.reason == "requeued: the scheduler runs it again"


def test_a_pending_answer_older_than_the_record_decides_nothing() -> None:
    # The wrapper claimed the record after the scheduler was asked: its start, not a requeue.
    record = _record("starting", updated_at=100.0)
    assert reconcile(record, JobStatus("pending"), asked_at=99.5) is record
    assert reconcile(record, JobStatus("pending")) is record  # no time: no judgement
    assert (
        reconcile(_record("pending", updated_at=1.0), JobStatus("pending"), asked_at=2.0).state
        == "pending"
    )


def test_a_ready_job_that_vanished_is_stale() -> None:
    done = reconcile(_record("ready"), JobStatus("missing"))
    assert (done.state, done.reason) == ("gone", "stale: scheduler says missing")


def test_a_job_that_ended_before_it_was_ready_failed() -> None:
    done = reconcile(_record("starting"), JobStatus("failed", "NonZeroExitCode"))
    assert (done.state, done.reason) == ("failed", "the job ended (failed) before it was ready")
    kept = reconcile(_record("starting", reason="weights not found"), JobStatus("done"))
    assert (kept.state, kept.reason) == ("failed", "weights not found")


def test_a_job_deleted_behind_our_back_is_gone() -> None:
    assert reconcile(_record("pending"), JobStatus("missing")).state == "gone"


def test_a_cancelled_job_is_gone_and_its_engine_pid_cleared() -> None:
    done = reconcile(_record("ready", engine_pid=1234), JobStatus("unknown"), cancelled=True)
    assert (done.state, done.reason, done.engine_pid) == ("gone", "cancelled", None)


def test_a_job_with_no_wrapper_moves_on_by_what_its_server_does() -> None:
    pending = _record("pending", node="svc.llm.svc", port=8000)
    starting = reconcile(pending, JobStatus("running", serving="starting"))
    assert starting.state == "starting"
    ready = reconcile(starting, JobStatus("running", serving="ready"))
    assert (ready.state, ready.base_url) == ("ready", "http://svc.llm.svc:8000/v1")
    assert reconcile(ready, JobStatus("running", serving="ready")) is ready
