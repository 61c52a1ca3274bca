"""When a drain ends, the drain budgets, and how the engine takes Slurm's TERM.

(What is in flight is counted by the job's front: tests/test_front.py.)
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.job.drain import drain
from hpc.job.engineproc import start_engine
from hpc.job.engines import EngineLaunch
from hpc.job.plan import JobPlan, warning_drain_s
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
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
    assert drained.waited_s >= 0.3  # the settle time, then idle (the budget was 10 s)


def test_a_drain_ends_at_the_budget_and_a_later_signal_only_shortens_it() -> None:
    deadlines = [time.monotonic() + 10]
    counter = _Counter([1])
    started = time.monotonic()
    # A second signal (Slurm's TERM at the time limit, after USR1) moves the deadline closer.
    deadlines.append(time.monotonic() + 0.4)
    drained = drain(_Proc(), counter, lambda: min(deadlines), poll_s=0.05)
    assert drained.why == "budget" and drained.in_flight == 1
    assert time.monotonic() - started >= 0.4  # the shortened budget, not the first one


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


def test_the_engine_ignores_slurms_term_and_stops_on_the_engine_stop_signal(
    tmp_path: Path,
) -> None:
    # The stand-in engine notes the stop signal it handled: a KILL after the grace leaves none.
    mark, ready = tmp_path / "stopped-by", tmp_path / "ready"
    script = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        f"    open({str(mark)!r}, 'w').write('INT')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n"
    )
    launch = EngineLaunch(
        argv=[sys.executable, "-c", script], env={}, health_path="/", health_needs_key=False
    )
    with open("/dev/null", "w") as out:
        proc, pump = start_engine(launch, {"PATH": "/usr/bin:/bin"}, out, KEY)
        try:
            for _ in range(200):  # its handler is in place (a loaded machine starts slowly)
                if ready.exists() or proc.poll() is not None:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # what scancel sends every process of the job
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)
            stop_tree(proc.pid, grace_s=5, sig=ENGINE_STOP_SIGNAL)
            assert not alive(proc.pid)
            # Ended by the stop signal itself, not by the KILL that follows the grace.
            assert mark.read_text() == "INT"
        finally:
            if alive(proc.pid):
                proc.kill()
            pump.join()
    # The wrapper's own TERM is not blocked after the engine started.
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set())
