"""Real vLLM, three ways in: straight to its socket, through the job's front, through the gateway.

    python -m bench.vllm_paths --model-dir DIR [--vllm-bin BIN] [--levels 1,4,16]
                               [--rounds 3] [--requests 16] [--max-tokens 64]

``mt submit`` starts a real vLLM job on the local backend (the job wrapper, the front, the
command line a GPU job gets; ``--vllm-bin`` first on the PATH: ``make vllm`` builds PyPI's
CPU build there, with ``--model-dir`` the converted Gemma 3 270M), then ``mt gateway``
routes to it. The same requests go to the engine's Unix socket (with the engine's own key,
read from its environment: this user's process), to the job's front (TLS, pinned, the
job's key) and to the gateway (the owner key); bench.pathcompare rotates the order from
round to round. Also reported: how long the job took from ``mt submit`` to ``ready``, and
the engine's start to healthy (the record's ``engine_started_at`` to ``ready``).
Everything runs under a temporary ``MT_HOME``; the job is cancelled at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from bench.loadgen import Target
from bench.mtgateway import running_gateway
from bench.pathcompare import compare, table
from bench.workload import Workload
from hpc import tlspin
from hpc.ownerkey import owner_key_path, read_owner_key
from hpc.registry import Record, Registry

MODEL = "gemma-vllm"
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def _mt(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0:
        raise SystemExit(f"mt {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def _engine_socket_and_key(record: Record) -> tuple[str, str]:
    engine = psutil.Process(record.engine_pid or 0)
    argv = engine.cmdline()
    return argv[argv.index("--uds") + 1], engine.environ()["VLLM_API_KEY"]


async def measure(
    record: Record, gateway_url: str, owner_key: str, args: argparse.Namespace
) -> str:
    socket_path, engine_key = _engine_socket_and_key(record)
    if record.base_url is None or record.tls_sha256 is None:
        raise SystemExit(f"the record has no front: {record.public()}")
    workload = Workload(models=(MODEL,), prompt_tokens=64, max_tokens=args.max_tokens)
    sessions = [
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket_path, limit=0)),
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=tlspin.pinned_context(record.tls_sha256))
        ),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)),
    ]
    targets = [
        Target("http://engine/v1", engine_key),
        Target(record.base_url, record.api_key.get_secret_value()),
        Target(gateway_url + "/v1", owner_key),
    ]
    names = ["engine", "front", "gateway"]
    paths = dict(zip(names, zip(sessions, targets, strict=True), strict=True))
    levels = tuple(int(x) for x in args.levels.split(","))
    try:
        runs = await compare(paths, workload, levels, args.rounds, args.requests)
    finally:
        for session in sessions:
            await session.close()
    return table(runs, names, levels)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.vllm_paths``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="a Hugging Face folder")
    parser.add_argument("--vllm-bin", type=Path, default=None, help="put first on the PATH")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16, help="per level and path, per round")
    parser.add_argument("--max-tokens", type=int, default=64, help="per answer")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="mt-bench-vllm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT_", "SLURM_"))}
    env |= CPU_ENV | {"MT_HOME": str(home / "mt-home"), "MT_MODELS": str(home / "models.yaml")}
    if args.vllm_bin is not None:
        env["PATH"] = f"{args.vllm_bin}:{env['PATH']}"
    (home / "models.yaml").write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    engine: vllm\n"
        f"    weights: {{source: {json.dumps(str(args.model_dir))}}}\n"
        '    engine_args: ["--max-model-len", "2048", "--enforce-eager"]\n'
        "    startup_timeout_s: 600\n",
        encoding="utf-8",
    )
    started = time.monotonic()
    submitted = json.loads(_mt(env, "submit", MODEL, "--wait", "--json"))
    to_ready = time.monotonic() - started
    job = str(submitted["key"])
    try:
        record = Registry(home / "mt-home" / "registry").read(job)
        if record is None or record.state != "ready":
            raise SystemExit(f"the job is not ready: {submitted}")
        healthy = record.updated_at - (record.engine_started_at or record.created_at)
        with running_gateway(env) as url:
            owner = read_owner_key(owner_key_path(home / "mt-home"))
            result = asyncio.run(measure(record, url, owner, args))
    finally:
        _mt(env, "cancel", job)
    print(f"mt submit → ready: {to_ready:.1f} s; vLLM start → healthy: {healthy:.1f} s\n")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
