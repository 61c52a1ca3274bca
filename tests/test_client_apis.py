"""The openai and anthropic clients against `mt gateway` and a real llama-server job, directly
and through `mt tunnel`: ``models.retrieve``, ``responses.create`` (streaming and not),
``messages.create`` and ``count_tokens`` (with ``x-api-key`` and with a bearer token), and
``/tokenize`` at the engine's root.

One real job (llama.cpp's own llama-server, MT_LLAMA_SERVER, with the Gemma 3 270M GGUF, a
base model: shapes and token counts are tested, not the words) and one gateway serve every
test of the module: starting them is most of the time. llama-server answers
``/v1/responses`` and ``/v1/messages`` itself; the gateway adds routing, its key and the
job's key, and Anthropic's error shape.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest
from mtcli import (
    GEMMA,
    gemma_models_yaml,
    llama_server_binary,
    llama_server_home,
    owner_key,
    ready_job,
    running_gateway,
)
from sshd import SSHServer
from tunnelkit import open_tunnel, write_config

from hpc.ownerkey import owner_key_path
from hpc.site import mt_home

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

HI = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class Served:
    """The module's gateway (its URL), the owner's key, and its MT_HOME."""

    url: str
    key: str
    home: Path


@pytest.fixture(scope="module")
def served(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real llama-server job, ready, and `mt gateway` in front of it, for the module."""
    binary = llama_server_binary(LLAMA_SERVER)
    root = tmp_path_factory.mktemp("client-apis")
    models = gemma_models_yaml(root / "models.yaml", gemma_gguf, engine_args=["--ctx-size", "2048"])
    home = llama_server_home(root, binary, models.read_text(encoding="utf-8"))
    with home, ready_job(GEMMA), running_gateway() as url:
        yield Served(url, owner_key(), mt_home())


def _check_openai(base_url: str, key: str) -> None:
    """models.retrieve, responses.create (not streaming, then streaming) through base_url."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0)
    model = client.models.retrieve(GEMMA)
    assert (model.id, model.object) == (GEMMA, "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    reply = client.responses.create(model=GEMMA, input="Hello", max_output_tokens=8)
    assert reply.id.startswith("resp_")
    assert reply.status == "completed"
    assert reply.usage is not None
    assert 0 < reply.usage.output_tokens <= 8
    stream = client.responses.create(model=GEMMA, input="Hello", max_output_tokens=8, stream=True)
    kinds = [event.type for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") > 1  # streamed, not one block


def _check_anthropic(base_url: str, key: str) -> None:
    """messages.create (both key headers), a stream, count_tokens through base_url."""
    for auth in ({"api_key": key}, {"auth_token": key}):
        client = anthropic.Anthropic(base_url=base_url, max_retries=0, **auth)
        reply = client.messages.create(model=GEMMA, max_tokens=8, messages=HI)
        assert reply.type == "message"
        assert reply.content[0].type == "text"
        assert 0 < reply.usage.output_tokens <= 8
    with client.messages.stream(model=GEMMA, max_tokens=8, messages=HI) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1  # streamed, not one block
    assert final.stop_reason in ("max_tokens", "end_turn")
    counted = client.messages.count_tokens(model=GEMMA, messages=HI)
    assert counted.input_tokens > 0
    wrong = anthropic.Anthropic(base_url=base_url, max_retries=0, api_key="mt-" + "x" * 43)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(model=GEMMA, max_tokens=8, messages=HI)
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["error"]["type"] == "authentication_error"


def test_the_openai_client_retrieves_models_and_creates_responses(served: Served) -> None:
    _check_openai(served.url, served.key)


def test_the_anthropic_client_creates_messages_with_either_key_header(served: Served) -> None:
    _check_anthropic(served.url, served.key)


def test_tokenize_reaches_the_engines_root_routed_by_model(served: Served) -> None:
    def post(path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1
            served.url + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {served.key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            answer = json.loads(response.read())
        assert isinstance(answer, dict)
        return answer

    tokens = post("/tokenize", {"model": GEMMA, "content": "Hello there"})["tokens"]
    assert isinstance(tokens, list) and tokens
    text = post("/detokenize", {"model": GEMMA, "tokens": tokens})["content"]
    assert isinstance(text, str) and "Hello there" in text
    with pytest.raises(urllib.error.HTTPError) as refused:
        post("/tokenize", {"model": "no-such-model", "content": "Hello"})
    assert refused.value.code == 404


@pytest.mark.ssh
@pytest.mark.usefixtures("no_agent")
@pytest.mark.parametrize("engine", ["openssh", "paramiko"])
def test_both_clients_through_mt_tunnel(
    served: Served, sshd: SSHServer, tmp_path: Path, engine: str
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    port = int(served.url.rsplit(":", 1)[1])
    key_file = owner_key_path(served.home)
    with open_tunnel(engine, config, port, "--owner-key", str(key_file)) as tunnel:
        env = tunnel.env()
        assert env["OPENAI_BASE_URL"] == f"{tunnel.url}/v1"
        key = env["OPENAI_API_KEY"]
        _check_openai(tunnel.url, key)
        _check_anthropic(tunnel.url, key)
