"""The faults the soak injects, one at a time per world, taking turns.

Each fault returns what it did (or why it was skipped: no ready job to hit, not root for
the disk, not Slurm for a requeue). Timed faults (a stopped engine, a full disk) end
within the call, so a fault never outlives the soak.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from bench.chaos.world import World
from hpc.registry import Record


@dataclass
class FaultLog:
    """What was injected in one world: counts per fault, done and skipped, with lines."""

    done: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    misfired: Counter[str] = field(default_factory=Counter)
    lines: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        """Counts per fault kind."""
        return {
            "done": dict(self.done),
            "skipped": dict(self.skipped),
            "misfired": dict(self.misfired),
        }


def _ready(world: World) -> Record | None:
    ready = [r for r in world.records() if r.state == "ready" and r.engine_pid]
    return ready[-1] if ready else None


def engine_kill(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """SIGKILL a ready job's engine."""
    record = _ready(world)
    if record is None or record.engine_pid is None:
        return None
    os.kill(record.engine_pid, signal.SIGKILL)
    return f"SIGKILL engine {record.engine_pid} of {record.key}"


def engine_stop(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """SIGSTOP a ready job's engine for ``hold_s``, then SIGCONT."""
    record = _ready(world)
    if record is None or record.engine_pid is None:
        return None
    pid = record.engine_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        stop.wait(hold_s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    return f"SIGSTOP engine {pid} of {record.key} for {hold_s:.0f} s"


def wrapper_kill(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """SIGKILL the job wrapper above a ready job's engine (its engine must not outlive it)."""
    record = _ready(world)
    if record is None or record.engine_pid is None:
        return None
    try:
        for parent in psutil.Process(record.engine_pid).parents():
            if "hpc.job.wrapper" in " ".join(parent.cmdline()):
                parent.kill()
                return f"SIGKILL wrapper {parent.pid} of {record.key}"
    except psutil.Error:
        return None
    return None


def gateway_restart(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """SIGTERM the gateway (in-flight streams get its shutdown), start a new one."""
    code = world.stop_gateway()
    world.start_gateway()
    return f"gateway restarted (old one exited {code})"


def requeue(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """``scontrol requeue`` a ready Slurm job."""
    record = _ready(world)
    if world.backend != "slurm" or record is None:
        return None
    done = subprocess.run(
        ["scontrol", "requeue", record.job_id], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {record.job_id}: {done.stderr.strip()}")
    return f"scontrol requeue {record.job_id} of {record.key}"


def disk_full(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """Fill the registry's tmpfs for ``hold_s``, then free it."""
    if not world.tmpfs:
        return None
    filler = world.registry_dir / ".chaos-filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        stop.wait(hold_s)
    finally:
        os.close(fd)
        filler.unlink()
    return f"registry disk full for {hold_s:.0f} s"


def tunnel_drop(world: World, stop: threading.Event, hold_s: float) -> str | None:
    """Drop the tunnel's SSH link (its sshd sessions killed; the server stays up)."""
    if world.drop_link is None:
        return None
    return f"dropped the tunnel's link ({world.drop_link()} sshd session processes killed)"


Fault = Callable[[World, threading.Event, float], "str | None"]
FAULTS: dict[str, Fault] = {
    "engine-kill": engine_kill,
    "engine-stop": engine_stop,
    "wrapper-kill": wrapper_kill,
    "gateway-restart": gateway_restart,
    "requeue": requeue,
    "disk-full": disk_full,
    "tunnel-drop": tunnel_drop,
}


def applicable(world: World) -> list[str]:
    """The faults that can hit this world."""
    names = [n for n in FAULTS if n != "requeue" or world.backend == "slurm"]
    names = [n for n in names if n != "tunnel-drop" or world.drop_link is not None]
    return [n for n in names if n != "disk-full" or world.tmpfs]


def fault_loop(
    world: World,
    log: FaultLog,
    stop: threading.Event,
    interval_s: float,
    hold_s: float,
    say: Callable[[str], None],
) -> None:
    """Every ``interval_s``, the next fault in turn, until ``stop``."""
    names = applicable(world)
    turn = 0
    while not stop.wait(interval_s):
        name = names[turn % len(names)]
        turn += 1
        try:
            what = FAULTS[name](world, stop, hold_s)
        except Exception as exc:  # noqa: BLE001 - the soak reports a fault that misfired
            log.misfired[name] += 1
            log.lines.append(f"{name}: failed to inject: {exc}")
            say(f"[{world.backend}] {name}: failed to inject: {exc}")
            continue
        finally:
            if world.gateway is None:  # a restart that did not come back: the soak needs one
                world.start_gateway(timeout_s=120)
        if what is None:
            log.skipped[name] += 1
            continue
        log.done[name] += 1
        log.lines.append(what)
        say(f"[{world.backend}] {what}")
