"""The servers the overhead run measures, each in its own process: the fake engine, the bare
aiohttp proxy, `mt gateway` (keys and rate limits on), and LiteLLM's proxy (from its own
venv, named by ``$MT_LITELLM``)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import sys
from pathlib import Path

from bench.proxyproc import ServerProcess

MODEL = "fake-model"
# Far above anything the run sends, so that the limiter runs on every request but never
# answers 429: 10,000 requests of ~100 tokens in a minute stay well under both.
_RATE_LIMITS = {"requests_per_min": 10_000_000, "tokens_per_min": 10_000_000_000}


def litellm_python() -> str:
    """The Python that runs LiteLLM's proxy: the one beside ``$MT_LITELLM`` (its own venv,
    made by `make bench`/`make test`), else this one."""
    command = os.environ.get("MT_LITELLM")
    return str(Path(command).with_name("python")) if command else sys.executable


def litellm_missing() -> str | None:
    """Why LiteLLM's proxy cannot run here, or None when it can."""
    if os.environ.get("MT_LITELLM"):
        python = litellm_python()
        if not Path(python).exists():
            return f"MT_LITELLM names no venv with a python: {python} is missing"
        return None
    for module in ("litellm", "fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            return f"LiteLLM's proxy is not installed ({module} is missing): " + (
                "pip install 'litellm[proxy]'"
            )
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MT_", "OPENAI_"))}
    env["MT_HOME"] = str(workdir / "mt-home")  # an empty registry: only the static route
    return env


def start_engine(
    max_tokens: int, tokens_per_s: float, ttft_ms: float, workdir: Path
) -> ServerProcess:
    """The fast fake engine in its own process."""
    argv = [
        sys.executable,
        "-m",
        "bench.fakeengine",
        "--model",
        MODEL,
        "--tokens",
        str(max_tokens),
        "--tokens-per-s",
        str(tokens_per_s),
        "--ttft-ms",
        str(ttft_ms),
    ]
    engine = ServerProcess("fake engine", argv, workdir / "engine.log", _base_env(workdir))
    engine.wait_listening_line()
    return engine


def start_bare(engine_url: str, workdir: Path) -> ServerProcess:
    """The bare pass-through proxy (``bench.bareproxy``) in front of the engine."""
    upstream = engine_url.removesuffix("/v1")
    argv = [sys.executable, "-m", "bench.bareproxy", "--upstream", upstream]
    proxy = ServerProcess("bare proxy", argv, workdir / "bare.log", _base_env(workdir))
    proxy.wait_listening_line()
    return proxy


def start_mt_gateway(engine_url: str, workdir: Path) -> tuple[ServerProcess, str]:
    """`mt gateway` with auth and rate limits on and a static route to the engine; returns
    it and its key."""
    from gateway.keys import create_key

    models = workdir / "models.yaml"
    models.write_text(
        f"static:\n  - name: {MODEL}\n    base_url: {json.dumps(engine_url)}\n", encoding="utf-8"
    )
    keys = workdir / "keys.yaml"
    key = create_key(
        keys,
        "bench",
        models=("fake-*",),
        requests_per_min=_RATE_LIMITS["requests_per_min"],
        tokens_per_min=_RATE_LIMITS["tokens_per_min"],
    )
    argv = [sys.executable, "-m", "hpc.cli", "--models", str(models), "gateway", "--port", "0"]
    argv += ["--keys", str(keys)]
    gateway = ServerProcess("mt gateway", argv, workdir / "gateway.log", _base_env(workdir))
    gateway.wait_listening_line()
    return gateway, key


def start_litellm(engine_url: str, workdir: Path) -> tuple[ServerProcess, str]:
    """LiteLLM's proxy, one worker, auth on (a master key, no database), routing ``MODEL``
    to the same engine; returns it and its key."""
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {json.dumps(engine_url)}\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  drop_params: true\n",
        encoding="utf-8",
    )
    port = _free_port()
    env = _base_env(workdir)
    # No network here: the bundled cost map, no telemetry, errors only in its log.
    env |= {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    env |= {"LITELLM_TELEMETRY": "False", "DISABLE_SCHEMA_UPDATE": "True"}
    key = "sk-bench-" + secrets.token_hex(16)
    env["LITELLM_MASTER_KEY"] = key  # it refuses to start without one, as it should
    code = "from litellm.proxy.proxy_cli import run_server; run_server()"
    argv = [litellm_python(), "-c", code, "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", "1"]
    proxy = ServerProcess("LiteLLM proxy", argv, workdir / "litellm.log", env)
    proxy.wait_http_ok(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=120)
    proxy.url = f"http://127.0.0.1:{port}"
    return proxy, key
