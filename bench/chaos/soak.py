"""The soak's timeline: start the worlds, stream and inject faults for the set time, wind
down as a user would (the gateway idle-cancels its jobs, then stops), and count."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.chaos.audit import (
    Audit,
    argv_hits,
    job_processes,
    log_files,
    log_hits,
    sample_loop,
    unfinished,
)
from bench.chaos.clients import Tally, client_loop
from bench.chaos.faults import FaultLog, fault_loop
from bench.chaos.world import MODEL, PLAIN_SILENCE_S, World


@dataclass(frozen=True)
class Settings:
    """What one soak run does."""

    minutes: float
    clients: int = 2
    fault_interval_s: float = 20.0
    hold_s: float = 10.0
    hung_s: float = 60.0
    max_outage_s: float = 240.0  # longest time a world may give no whole answer at all
    wind_down_s: float = 120.0


def say(text: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One world's moving parts during the soak."""

    world: World
    tally: Tally
    faults: FaultLog
    audit: Audit


def _threads(
    run: Run,
    settings: Settings,
    stop_clients: threading.Event,
    stop_faults: threading.Event,
    stop_audit: threading.Event,
) -> list[threading.Thread]:
    world = run.world
    threads = [
        threading.Thread(
            target=client_loop,
            args=("127.0.0.1", world.port, MODEL, run.tally, stop_clients, settings.hung_s, i),
            name=f"client-{world.backend}-{i}",
        )
        for i in range(settings.clients)
    ]
    threads.append(
        threading.Thread(
            target=fault_loop,
            args=(world, run.faults, stop_faults, settings.fault_interval_s, settings.hold_s, say),
            name=f"faults-{world.backend}",
        )
    )
    threads.append(
        threading.Thread(
            target=sample_loop, args=(world, run.audit, stop_audit), name=f"audit-{world.backend}"
        )
    )
    return threads


def _wind_down(runs: list[Run], settings: Settings) -> None:
    """Wait for the gateways to idle-cancel their jobs, stop them, let ``mt status`` settle."""
    deadline = time.monotonic() + settings.wind_down_s
    while time.monotonic() < deadline and any(unfinished(r.world) for r in runs):
        time.sleep(1)
    for run in runs:
        code = run.world.stop_gateway()
        say(f"[{run.world.backend}] gateway stopped (exit {code})")
        status = run.world.mt("status", "--json")
        if status.returncode != 0:
            say(f"[{run.world.backend}] mt status: {status.stderr.strip()}")


def _leftovers(since: float, wait_s: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + wait_s
    while (left := job_processes(since)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def _force_clean(runs: list[Run], left: list[psutil.Process]) -> None:
    """Leave the machine clean after counting: cancel what is unfinished, kill what is left."""
    for run in runs:
        for line in unfinished(run.world):
            run.world.mt("cancel", line.split()[0], timeout=90)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run_soak(worlds: list[World], settings: Settings) -> dict[str, Any]:
    """The whole soak over ``worlds``; the report."""
    since = time.time()
    runs = [Run(w, Tally(), FaultLog(), Audit()) for w in worlds]
    stop_clients, stop_faults, stop_audit = threading.Event(), threading.Event(), threading.Event()
    threads = []
    for run in runs:
        run.world.prepare()
        run.world.start_gateway()
        say(f"[{run.world.backend}] gateway on port {run.world.port}")
        threads.append(_threads(run, settings, stop_clients, stop_faults, stop_audit))
    for group in threads:
        for thread in group:
            thread.start()
    end = time.monotonic() + settings.minutes * 60
    while (left_s := end - time.monotonic()) > 0:
        time.sleep(min(30.0, left_s))
        for run in runs:
            counts = {k: v for k, v in run.tally.summary().items() if k != "examples"}
            say(f"[{run.world.backend}] {json.dumps(counts)}")
    stop_faults.set()
    for group in threads:
        group[-2].join(timeout=settings.hold_s + 150)
    stop_clients.set()
    for group in threads:
        for thread in group[:-2]:
            thread.join(timeout=max(settings.hung_s, PLAIN_SILENCE_S) + 30)
    say("clients stopped; waiting for the gateways to idle-cancel their jobs")
    _wind_down(runs, settings)
    stop_audit.set()
    for group in threads:
        group[-1].join(timeout=60)
    left = _leftovers(since)
    keys: set[str] = set().union(*(r.audit.keys for r in runs))
    report: dict[str, Any] = {"minutes": settings.minutes, "worlds": {}}
    for run in runs:
        report["worlds"][run.world.backend] = {
            "requests": run.tally.summary(),
            "faults": run.faults.summary(),
            "gateway_starts": run.world.gateway_starts,
            "duplicate_jobs": max(0, run.audit.max_live - 1),
            "duplicate_samples": run.audit.duplicate_samples,
            "duplicate_examples": run.audit.duplicate_examples,
            "records_unfinished": unfinished(run.world),
            "keys_in_argv": sorted(set(run.audit.argv_hits)),
            "keys_in_logs": log_hits(keys, log_files(run.world)),
            "keys_seen": len(run.audit.keys),
            "fault_log": run.faults.lines[-200:],
        }
    report["keys_in_argv_at_end"] = argv_hits(keys)
    report["processes_left"] = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left if _alive(p)]
    _force_clean(runs, left)
    report["max_outage_s"] = settings.max_outage_s
    report["ok"] = verdict(report, settings.max_outage_s)
    return report


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def verdict(report: dict[str, Any], max_outage_s: float) -> bool:
    """True when nothing hung, was lost, doubled, leaked or was left behind, and every world
    came back after each fault (no stretch without a whole answer beyond ``max_outage_s``)."""
    for world in report["worlds"].values():
        requests = world["requests"]
        if requests["hung"] or requests["lost"] or not requests["whole"]:
            return False
        if requests["longest_outage_s"] > max_outage_s:
            return False
        if world["duplicate_jobs"] or world["records_unfinished"]:
            return False
        if world["keys_in_argv"] or world["keys_in_logs"]:
            return False
    return not (report["processes_left"] or report["keys_in_argv_at_end"])


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """The report as JSON on stdout (and in ``out``)."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    print(text)
    os.sync()
