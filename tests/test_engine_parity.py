"""The gateway's contract, for real, on every engine mt runs: one models.yaml name served in
turn by vLLM (its CPU build), llama.cpp's `llama-server` and llama-cpp-python's server, each
through the job wrapper and its front, reached through `mt gateway`:

- a streamed chat arrives in several chunks and ends with ``data: [DONE]``;
- ``stream_options.include_usage`` gives a usage chunk on every engine (the gateway adds
  it where the engine sends none: llama-cpp-python), and a non-streamed answer has usage;
- an error the engine reports (a prompt longer than the context) reaches the client as the
  engine's 400 with an OpenAI error body, not a 502 and not a hang;
- a client that goes away mid-stream stops the engine's generation: llama-server's log says
  "cancel task", llama-cpp-python's "Disconnected from client"; vLLM logs nothing (its
  request log is off by default) and counts no abort, so its own ``/metrics`` shows it:
  ``vllm:num_requests_running`` back to 0 with far fewer tokens generated than the answer
  asked for (run to its end, it would have generated all of them first).

Embeddings are checked where an engine serves them: llama-server started with ``--embeddings
--pooling mean`` (tests/realengine.py's session job) answers ``/v1/embeddings`` through the
gateway in tests/test_gateway_proxy.py. vLLM 0.32 serves a generation model's embeddings only
as another server (a pooling runner), and llama-cpp-python's only with ``--embedding``, which
changes what the server is: neither is part of this parity run.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jobclient import job_get
from mtcli import mt, owner_headers, owner_key, ready_job, running_gateway
from poolhelpers import wait_for
from pythonserver import python_server_only  # noqa: F401 - the fixture
from test_llama_server import llama_server_first  # noqa: F401 - the fixture
from test_vllm import gemma_hf, vllm_spec  # noqa: F401 - the fixture

from hpc.registry import Record, Registry

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(420)]

MODEL = "parity"
ENGINES = ["vllm", "llama-server", "llama-cpp-python"]
# What llama.cpp's servers write into their log when a client goes away mid-stream.
ABORT_LINE = {"llama-server": "cancel task", "llama-cpp-python": "Disconnected from client"}
LONG_ANSWER = 1500  # tokens the walked-away request asks for
# Gemma's <eos> and <end_of_turn>: never chosen, so a long generation runs until cut.
NO_EOS = {"1": -100, "106": -100}


def _llamacpp_entry(gguf: Path, args: list[str]) -> str:
    return (
        f"  - name: {MODEL}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        f"    engine_args: {json.dumps(args)}\n"
        "    startup_timeout_s: 120\n"
    )


@pytest.fixture(params=ENGINES)
def served(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """(engine, job key) of a ready job serving MODEL with that engine."""
    engine = str(request.param)
    if engine == "vllm":
        entry = vllm_spec(request.getfixturevalue("gemma_hf"), name=MODEL)
    elif engine == "llama-server":
        request.getfixturevalue("llama_server_first")
        entry = _llamacpp_entry(request.getfixturevalue("gemma_gguf"), ["--ctx-size", "2048"])
    else:
        gguf = request.getfixturevalue("gemma_gguf")  # first: assembled under the real HOME
        request.getfixturevalue("python_server_only")
        entry = _llamacpp_entry(gguf, ["--n_ctx", "2048", "--chat_format", "gemma"])
    models = tmp_path / "models.yaml"
    models.write_text("models:\n" + entry, encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(models))
    with ready_job(MODEL) as submitted:
        yield engine, str(submitted["key"])


async def _sse(url: str, body: dict[str, Any]) -> list[str]:
    """The ``data:`` payloads of one streamed request through the gateway."""
    async with (
        aiohttp.ClientSession(headers=owner_headers()) as client,
        client.post(url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        payloads = []
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                payloads.append(line[5:].strip())
        return payloads


async def _walk_away(url: str) -> int:
    """Start a long completion, read a few chunks, close the connection: chunks read."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": LONG_ANSWER,
        "temperature": 0,
        "logit_bias": NO_EOS,
        "stream": True,
    }
    seen = 0
    async with aiohttp.ClientSession(headers=owner_headers()) as client:
        resp = await client.post(url + "/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        async for raw in resp.content:
            if raw.startswith(b"data:"):
                assert raw.strip() != b"data: [DONE]", "the answer ended before the test left"
                seen += 1
            if seen == 3:
                break
        resp.close()  # the client goes away, mid-answer
    return seen


def _vllm_sample(record: Record, name: str) -> float:
    """The sum of one series in vLLM's ``/metrics`` (asked through the job's front)."""
    status, body = job_get(record, "/metrics", record.api_key.get_secret_value())
    assert status == 200, body
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_every_engine_keeps_the_gateways_contract(served: tuple[str, str]) -> None:
    import openai

    engine, job = served
    log = Path(os.environ["MT_HOME"]) / "logs" / f"{job}.log"
    record = Registry(Path(os.environ["MT_HOME"]) / "registry").read(job)
    assert record is not None and record.engine == ("vllm" if engine == "vllm" else "llamacpp")
    with running_gateway() as url:
        # Streaming, [DONE], and usage whether or not the engine sends it.
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name three colours."}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payloads = asyncio.run(_sse(url, body))
        assert payloads[-1] == "[DONE]", payloads
        chunks = [json.loads(p) for p in payloads[:-1]]
        texts = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
        assert len([t for t in texts if t]) > 1, chunks
        usage = chunks[-1].get("usage")
        assert usage and usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0, chunks

        client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key(), max_retries=0)
        reply = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
        )
        assert reply.choices[0].text.strip() and reply.usage and reply.usage.completion_tokens

        # The engine's own error, passed on as it is: a prompt over the 2048-token context.
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=MODEL, prompt="colour " * 3000, max_tokens=8)
        assert refused.value.status_code == 400

        # A client that walks away stops the engine's generation.
        vllm = engine == "vllm"
        generated = _vllm_sample(record, "vllm:generation_tokens_total") if vllm else 0.0
        assert asyncio.run(_walk_away(url)) == 3
        if vllm:
            wait_for(
                "vLLM to stop the request",
                lambda: _vllm_sample(record, "vllm:num_requests_running") == 0,
                timeout_s=120,
            )
            more = _vllm_sample(record, "vllm:generation_tokens_total") - generated
            assert 0 < more < LONG_ANSWER, more
        else:
            marker = ABORT_LINE[engine]
            wait_for(
                f"{engine} to log {marker!r}",
                lambda: marker in log.read_text(encoding="utf-8", errors="replace"),
                timeout_s=120,
            )
    assert mt("status", "--json").returncode == 0
