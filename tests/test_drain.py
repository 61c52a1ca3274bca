"""When a drain ends, the drain budgets, and how the engine takes Slurm's TERM.

(What is in flight is counted by the job's front: tests/test_front.py.)
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hpc.job.drain import drain
from hpc.job.engines import EngineLaunch
from hpc.job.plan import JobPlan, warning_drain_s
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.job.wrapper import start_engine
from hpc.liveness import alive
from hpc.spec import DEFAULT_DRAIN_S, ModelSpec

pytestmark = pytest.mark.timeout(30)

KEY = "mtj-drain-test-key"


class _Proc:
    def __init__(self, code: int | None = None) -> None:
        self.code = code

    def poll(self) -> int | None:
        return self.code


@dataclasses.dataclass
class _Counter:
    answers: list[int | None]
    method: str = "fake"

    def count(self) -> int | None:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def test_a_drain_waits_out_the_settle_time_then_ends_when_idle() -> None:
    deadline = time.monotonic() + 10
    drained = drain(_Proc(), _Counter([2, 1, 0]), lambda: deadline, settle_s=0.3, poll_s=0.05)
    assert drained.why == "idle" and drained.in_flight == 0
    assert 0.3 <= drained.waited_s < 2


def test_a_drain_ends_at_the_budget_and_a_later_signal_only_shortens_it() -> None:
    deadlines = [time.monotonic() + 10]
    counter = _Counter([1])
    started = time.monotonic()
    # A second signal (Slurm's TERM at the time limit, after USR1) moves the deadline closer.
    deadlines.append(time.monotonic() + 0.4)
    drained = drain(_Proc(), counter, lambda: min(deadlines), poll_s=0.05)
    assert drained.why == "budget" and drained.in_flight == 1
    assert 0.4 <= time.monotonic() - started < 1.5


def test_a_drain_ends_when_the_engine_exits() -> None:
    drained = drain(_Proc(0), _Counter([1]), lambda: time.monotonic() + 10)
    assert drained.why == "exited"


def test_budgets_after_each_signal() -> None:
    spec = ModelSpec.model_validate(
        {"name": "m", "engine": "vllm", "weights": {"source": "org/m"}, "drain_s": 20}
    )
    plan = JobPlan(
        spec=spec,
        backend="slurm",
        nonce="n",
        registry_dir=Path("/r"),
        drain_s=spec.drain_s,
        warning_drain_s=warning_drain_s(spec.slurm.signal_grace_s),
    )
    assert plan.drain_budget_s(signal.SIGTERM) == plan.drain_budget_s(signal.SIGINT) == 20
    assert plan.drain_budget_s(signal.SIGUSR1) == plan.drain_budget_s(signal.SIGUSR2) == 105
    assert warning_drain_s(10) == 0  # a warning shorter than the engine's stop: no drain
    bare = JobPlan(spec=spec, backend="local", nonce="n", registry_dir=Path("/r"))
    assert bare.drain_budget_s(signal.SIGUSR1) == bare.drain_budget_s(signal.SIGTERM)
    assert bare.drain_s == DEFAULT_DRAIN_S == 15


def test_the_engine_ignores_slurms_term_and_stops_on_the_engine_stop_signal() -> None:
    launch = EngineLaunch(argv=["sleep", "60"], env={}, health_path="/", health_needs_key=False)
    with open("/dev/null", "w") as out:
        proc, pump = start_engine(launch, {"PATH": "/usr/bin:/bin"}, out, KEY)
        try:
            proc.send_signal(signal.SIGTERM)  # what scancel sends every process of the job
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            started = time.monotonic()
            stop_tree(proc.pid, grace_s=5, sig=ENGINE_STOP_SIGNAL)
            assert not alive(proc.pid)
            assert time.monotonic() - started < 2  # by INT, not by the KILL after grace
        finally:
            if alive(proc.pid):
                proc.kill()
            pump.join()
    # The wrapper's own TERM is not blocked after the engine started.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
