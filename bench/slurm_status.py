"""`mt status` with many registered Slurm jobs, against a bare `squeue --json` in one session.

    python -m bench.slurm_status [--jobs 200] [--rounds 5] [--private-cluster]

Submits N held jobs (`sbatch --hold --wrap 'sleep 600'`: real jobs the controller tracks,
no CPU used), writes a registry record for each, then times the library call behind
`mt status` (one squeue for all jobs, joined with the records) and the whole CLI
(`python -m hpc.cli status --json`), beside the baseline of one bare `squeue --json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from pydantic import SecretStr

from hpc.jobs import job_views
from hpc.registry import Record, Registry, new_api_key, new_nonce
from hpc.site import Site, SiteConfig
from hpc.slurm.client import SlurmClient
from hpc.transport import LocalTransport


def _median_s(fn: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--private-cluster", action="store_true")
    args = parser.parse_args(argv)
    cluster: AbstractContextManager[object] = nullcontext()
    if args.private_cluster:
        from bench.privatecluster import private_cluster

        cluster = private_cluster()
    with cluster, tempfile.TemporaryDirectory(prefix="mt-bench-") as tmp:
        home = Path(tmp)
        site = Site(SiteConfig(), home)
        registry = Registry(site.registry_dir)
        client = SlurmClient(LocalTransport())
        ids = []
        try:
            for i in range(args.jobs):
                job_id = client.sbatch(
                    f"#!/bin/bash\n#SBATCH --hold\n#SBATCH --job-name=mt-bench-{i}\n"
                    f"#SBATCH --output=/dev/null\nsleep 600\n"
                )
                ids.append(job_id)
                registry.write(
                    Record(
                        backend="slurm",
                        job_id=job_id,
                        nonce=new_nonce(),
                        model=f"model-{i % 7}",
                        engine="vllm",
                        state="pending",
                        api_key=SecretStr(new_api_key()),
                    )
                )
            squeue_s = _median_s(lambda: client.run(["squeue", "--json"]), args.rounds)
            views_s = _median_s(lambda: job_views(site), args.rounds)
            env = {**os.environ, "MT_HOME": str(home)}
            cli = [sys.executable, "-m", "hpc.cli", "status", "--json"]
            cli_s = _median_s(
                lambda: subprocess.run(cli, env=env, check=True, capture_output=True), args.rounds
            )
            rows = json.loads(subprocess.run(cli, env=env, check=True, capture_output=True).stdout)
            held = [r for r in rows if r["scheduler"]["reason"] == "JobHeldUser"]
            if len(rows) != args.jobs or len(held) != args.jobs:
                raise SystemExit(f"expected {args.jobs} held jobs in mt status, got {len(held)}")
        finally:
            for job_id in ids:
                client.scancel(job_id)
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "rounds": args.rounds,
                "squeue_json_s": round(squeue_s, 3),
                "status_library_s": round(views_s, 3),
                "mt_status_cli_s": round(cli_s, 3),
                "ratio_library_over_squeue": round(views_s / squeue_s, 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
