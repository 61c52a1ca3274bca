"""A swap pool answers the agents' APIs for every name of its catalogue: the Responses API
(`openai`'s ``responses.create``) and the Messages API (`anthropic`'s ``messages.create``,
its stream, ``count_tokens``), through the real gateway, loaded or not.

One pool job (`mt submit`, local backend) with one slot and two names of the real Gemma 3
270M GGUF, each served by llama.cpp's own llama-server (MT_LLAMA_SERVER, which serves both
APIs itself), and one gateway, for the module: every other request swaps the slot, so the
cold path (a stream kept alive with SSE comments while its model loads) is taken too. A
base model: shapes and token counts are tested, not the words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from mtcli import llama_server_binary, llama_server_home, mt, owner_key, running_gateway

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(600)]

POOL, MODEL_A, MODEL_B = "agents-pool", "pooled-a", "pooled-b"
HI = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class Pooled:
    """The module's gateway URL and the owner's key."""

    url: str
    key: str


@pytest.fixture(scope="module")
def pooled(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pooled]:
    """A ready one-slot pool of two llama-server models and `mt gateway` in front of it."""
    binary = llama_server_binary(LLAMA_SERVER)
    root = tmp_path_factory.mktemp("pool-agents")
    models = [
        {
            "name": name,
            "engine": "llamacpp",
            "weights": {"source": str(gemma_gguf)},
            "engine_args": ["--ctx-size", "2048"],
            "startup_timeout_s": 120,
        }
        for name in (MODEL_A, MODEL_B)
    ]
    pool = {"name": POOL, "models": [MODEL_A, MODEL_B], "slots": 1}
    lines = ["models:", *(f"  - {json.dumps(m)}" for m in models)]
    lines += ["pools:", f"  - {json.dumps(pool)}"]
    with llama_server_home(root, binary, "\n".join(lines) + "\n"):  # JSON lines are YAML
        record = json.loads(mt("submit", POOL, "--wait", "--json").stdout)
        try:
            assert record["state"] == "ready", record
            assert record["serves"] == [MODEL_A, MODEL_B]
            with running_gateway() as url:
                yield Pooled(url, owner_key())
        finally:
            mt("cancel", str(record["key"]), check=False)


def _responses(pooled: Pooled, model: str, *, stream: bool) -> None:
    client = openai.OpenAI(base_url=pooled.url + "/v1", api_key=pooled.key, max_retries=0)
    if not stream:
        reply = client.responses.create(model=model, input="Hello", max_output_tokens=8)
        assert reply.id.startswith("resp_")
        assert reply.status == "completed"
        assert reply.usage is not None
        assert 0 < reply.usage.output_tokens <= 8
        return
    events = client.responses.create(model=model, input="Hello", max_output_tokens=8, stream=True)
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1


def _messages(pooled: Pooled, model: str, *, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=pooled.url, api_key=pooled.key, max_retries=0)
    if not stream:
        reply = client.messages.create(model=model, max_tokens=8, messages=HI)
        assert reply.type == "message"
        assert 0 < reply.usage.output_tokens <= 8
        return
    with client.messages.stream(model=model, max_tokens=8, messages=HI) as events:
        pieces = list(events.text_stream)
        final = events.get_final_message()
    assert len(pieces) > 1
    assert final.stop_reason in ("max_tokens", "end_turn")


@pytest.mark.parametrize(
    ("api", "model", "stream"),
    [
        ("responses", MODEL_A, False),
        ("messages", MODEL_B, True),  # B is not loaded: the cold stream, kept alive meanwhile
        ("messages", MODEL_A, False),
        ("responses", MODEL_B, True),  # cold again
    ],
    ids=["responses-a", "messages-stream-b-cold", "messages-a", "responses-stream-b-cold"],
)
def test_a_pool_answers_the_agents_apis_for_every_name(
    pooled: Pooled, api: str, model: str, stream: bool
) -> None:
    if api == "responses":
        _responses(pooled, model, stream=stream)
    else:
        _messages(pooled, model, stream=stream)


def test_count_tokens_reaches_a_pooled_model(pooled: Pooled) -> None:
    client = anthropic.Anthropic(base_url=pooled.url, auth_token=pooled.key, max_retries=0)
    counted = client.messages.count_tokens(model=MODEL_A, messages=HI)
    assert counted.input_tokens > 0
