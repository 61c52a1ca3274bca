"""The soak's timeline: start the worlds (and their tunnels), stream and inject faults for
the set time, wind down as a user would (the gateway idle-cancels its jobs, then stops),
and count."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
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
from bench.chaos.tunnel import close_tunnel, drop_links, login_server, open_tunnel, ssh_config
from bench.chaos.world import MODEL, PLAIN_SILENCE_S, World

TUNNEL_ENGINES = ("openssh", "paramiko")  # the first world's tunnel, the second's


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
    tunnels: bool = True


def say(text: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One world's moving parts during the soak."""

    world: World
    tally: Tally = field(default_factory=Tally)
    via_tunnel: Tally = field(default_factory=Tally)
    faults: FaultLog = field(default_factory=FaultLog)
    audit: Audit = field(default_factory=Audit)
    clients: list[threading.Thread] = field(default_factory=list)
    others: list[threading.Thread] = field(default_factory=list)  # its faults and its audit


@dataclass
class Stops:
    """One event per kind of thread, set in the order the soak winds down."""

    faults: threading.Event = field(default_factory=threading.Event)
    clients: threading.Event = field(default_factory=threading.Event)
    audit: threading.Event = field(default_factory=threading.Event)


def _client(
    port: int, tally: Tally, stops: Stops, settings: Settings, seed: int, key: str
) -> threading.Thread:
    return threading.Thread(
        target=client_loop,
        args=("127.0.0.1", port, MODEL, tally, stops.clients, settings.hung_s, seed, key),
        daemon=True,
    )


def _start_threads(run: Run, settings: Settings, stops: Stops) -> None:
    world = run.world
    key = world.owner_key()
    run.audit.keys.add(key)  # never in an argv or a log either
    run.clients = [
        _client(world.port, run.tally, stops, settings, i, key) for i in range(settings.clients)
    ]
    if world.tunnel is not None:
        tunnel_client = _client(world.tunnel.local_port, run.via_tunnel, stops, settings, 99, key)
        run.clients.append(tunnel_client)
    run.others = [
        threading.Thread(
            target=fault_loop,
            args=(world, run.faults, stops.faults, settings.fault_interval_s, settings.hold_s, say),
            daemon=True,
        ),
        threading.Thread(target=sample_loop, args=(world, run.audit, stops.audit), daemon=True),
    ]
    for thread in (*run.clients, *run.others):
        thread.start()


def _wind_down(runs: list[Run], settings: Settings) -> None:
    """Wait for the gateways to idle-cancel their jobs, stop them, let ``mt status`` settle."""
    deadline = time.monotonic() + settings.wind_down_s
    while time.monotonic() < deadline and any(unfinished(r.world) for r in runs):
        time.sleep(1)
    for run in runs:
        if run.world.tunnel is not None:
            close_tunnel(run.world.tunnel)
        code = run.world.stop_gateway()
        say(f"[{run.world.backend}] gateway stopped (exit {code})")
        status = run.world.mt("status", "--json")
        if status.returncode != 0:
            say(f"[{run.world.backend}] mt status: {status.stderr.strip()}")


def _leftovers(since: float, runs: list[Run], wait_s: float = 30.0) -> list[psutil.Process]:
    roots = [r.world.root for r in runs]
    deadline = time.monotonic() + wait_s
    while (left := job_processes(since, roots)) and time.monotonic() < deadline:
        time.sleep(1)
    return [p for p in left if _alive(p)]


def force_clean(worlds: list[World], left: list[psutil.Process]) -> None:
    """Leave the machine clean after counting: cancel what is unfinished, kill what is left."""
    for world in worlds:
        world.stop_gateway()
        for line in unfinished(world):
            world.mt("cancel", line.split()[0], timeout=90)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def run_soak(worlds: list[World], settings: Settings) -> dict[str, Any]:
    """The whole soak over ``worlds``; the report."""
    since = time.time()
    runs = [Run(w) for w in worlds]
    stops = Stops()
    with contextlib.ExitStack() as servers:
        for i, run in enumerate(runs):
            world = run.world
            world.prepare()
            world.start_gateway()
            say(f"[{world.backend}] gateway on port {world.port}")
            if settings.tunnels:
                server = servers.enter_context(login_server(world.root))
                config = ssh_config(server, world.root / "ssh_config")
                world.tunnel = open_tunnel(world, TUNNEL_ENGINES[i % 2], config)
                world.drop_link = lambda server=server: drop_links(server)
                say(f"[{world.backend}] {world.tunnel.engine} tunnel on {world.tunnel.local_port}")
        for run in runs:
            _start_threads(run, settings, stops)
        end = time.monotonic() + settings.minutes * 60
        while (left_s := end - time.monotonic()) > 0:
            time.sleep(min(30.0, left_s))
            for run in runs:
                counts = {k: v for k, v in run.tally.summary().items() if k != "examples"}
                say(f"[{run.world.backend}] {json.dumps(counts)}")
        stops.faults.set()
        for run in runs:
            run.others[0].join(timeout=settings.hold_s + 150)
        stops.clients.set()
        for run in runs:
            for thread in run.clients:
                thread.join(timeout=max(settings.hung_s, PLAIN_SILENCE_S) + 30)
        say("clients stopped; waiting for the gateways to idle-cancel their jobs")
        _wind_down(runs, settings)
    stops.audit.set()
    for run in runs:
        run.others[1].join(timeout=60)
    return _report(runs, settings, _leftovers(since, runs))


def _report(runs: list[Run], settings: Settings, left: list[psutil.Process]) -> dict[str, Any]:
    keys: set[str] = set().union(*(r.audit.keys for r in runs))
    report: dict[str, Any] = {"minutes": settings.minutes, "worlds": {}}
    for run in runs:
        world = run.world
        report["worlds"][world.backend] = {
            "requests": run.tally.summary(),
            "tunnel": world.tunnel.engine if world.tunnel is not None else None,
            "requests_via_tunnel": run.via_tunnel.summary(),
            "faults": run.faults.summary(),
            "gateway_starts": world.gateway_starts,
            "duplicate_jobs": max(0, run.audit.max_live - 1),
            "duplicate_samples": run.audit.duplicate_samples,
            "duplicate_examples": run.audit.duplicate_examples,
            "records_unfinished": unfinished(world),
            "keys_in_argv": sorted(set(run.audit.argv_hits)),
            "keys_in_logs": log_hits(keys, log_files(world)),
            "keys_seen": len(run.audit.keys),
            "fault_log": run.faults.lines[-200:],
        }
    report["keys_in_argv_at_end"] = argv_hits(keys)
    report["processes_left"] = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left]
    force_clean([r.world for r in runs], left)
    report["max_outage_s"] = settings.max_outage_s
    report["ok"] = verdict(report, settings.max_outage_s)
    return report


def verdict(report: dict[str, Any], max_outage_s: float) -> bool:
    """True when nothing hung, was lost, doubled, leaked or was left behind, every world came
    back after each fault (no stretch without a whole answer beyond ``max_outage_s``), and
    nothing was cut but by a dropped tunnel."""
    for world in report["worlds"].values():
        direct, tunnelled = world["requests"], world["requests_via_tunnel"]
        if direct["hung"] or direct["lost"] or direct["cut"] or not direct["whole"]:
            return False
        if tunnelled["sent"] and (tunnelled["hung"] or tunnelled["lost"] or not tunnelled["whole"]):
            return False
        if direct["longest_outage_s"] > max_outage_s:
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
