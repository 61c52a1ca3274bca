"""What the soak checks besides the clients' outcomes: duplicate jobs, per-job keys in
process arguments and logs, processes left running and records left unfinished."""

from __future__ import annotations

import base64
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.chaos.world import REPLICAS, World
from hpc.registry import FINAL_STATES

# What runs a job: the wrapper and the engines it starts (llama.cpp's server, vLLM).
JOB_PROCESS_MARKS = (
    "hpc.job.wrapper",
    "hpc.jobwrap",
    "hpc.job.llamacpp_python",
    "llama_cpp.server",
    "llama-server",
    "vllm",
)


@dataclass
class Audit:
    """What the sampler saw in one world while the soak ran."""

    keys: set[str] = field(default_factory=set)
    samples: int = 0
    max_live: int = 0
    duplicate_samples: int = 0
    duplicate_examples: list[str] = field(default_factory=list)
    argv_hits: list[str] = field(default_factory=list)


def sample_loop(world: World, audit: Audit, stop: threading.Event, every_s: float = 1.0) -> None:
    """Once a second: the keys of every record, and how many jobs serve the model."""
    while not stop.wait(every_s):
        for record in world.records():
            audit.keys.add(record.api_key.get_secret_value())
        live = world.live_jobs()
        audit.samples += 1
        audit.max_live = max(audit.max_live, len(live))
        if len(live) > REPLICAS:
            audit.duplicate_samples += 1
            if len(audit.duplicate_examples) < 5:
                jobs = ", ".join(f"{r.key} {r.state}" for r in live)
                audit.duplicate_examples.append(f"{time.strftime('%H:%M:%S')} {jobs}")
        if audit.samples % 5 == 0:
            audit.argv_hits.extend(argv_hits(audit.keys))


def argv_hits(keys: Iterable[str]) -> list[str]:
    """Processes whose arguments hold one of ``keys`` (what ``ps`` shows every user)."""
    wanted = [k for k in keys if k]
    hits = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        args = " ".join(proc.info["cmdline"] or ())
        if any(key in args for key in wanted):
            hits.append(f"pid {proc.info['pid']}: {args[:80]}…")
    return hits


def key_forms(key: str) -> list[str]:
    """The key as a log line could carry it: plain, URL-encoded, and base64 at each offset."""
    forms = [key, urllib.parse.quote(key, safe="")]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + key.encode()).decode()
        # Drop the characters the neighbouring bytes change; the middle is the key's own.
        forms.append(encoded[(offset * 4 + 2) // 3 + 1 : -4])
    return [f for f in dict.fromkeys(forms) if len(f) >= 16]


def log_hits(keys: Iterable[str], files: Iterable[Path]) -> list[str]:
    """Log files holding one of ``keys`` in any of its forms."""
    forms = {form: key[:4] for key in keys if key for form in key_forms(key)}
    hits: list[str] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        hits.extend(f"{path}: key {k}… as {form[:6]}…" for form, k in forms.items() if form in text)
    return hits


def log_files(world: World) -> list[Path]:
    """The world's logs: the gateways' and tunnels' output, every job's log, sshd's."""
    logs = world.home / "logs"
    found = [p for p in logs.rglob("*") if p.is_file()] if logs.is_dir() else []
    found += [p for p in world.root.rglob("*.log") if p.is_file()]
    return sorted(set(found))


def job_processes(since: float, roots: Iterable[Path] = ()) -> list[psutil.Process]:
    """Wrappers, engines, tunnels and anything naming one of ``roots`` (the worlds' own
    directories: ssh configs, plans), started since ``since`` and still alive."""
    marks = (*JOB_PROCESS_MARKS, "hpc.cli tunnel", *(str(root) for root in roots))
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        if proc.info["create_time"] < since or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        args = " ".join(proc.info["cmdline"] or ())
        if any(mark in args for mark in marks) and "bench.chaos" not in args:
            out.append(proc)
    return out


def unfinished(world: World) -> list[str]:
    """Records not in a final state (``gone``/``failed``)."""
    return [f"{r.key} {r.state}" for r in world.records() if r.state not in FINAL_STATES]
