"""The real llama-cpp-python server (which sends no usage event) behind the gateway: the
openai client still gets its usage chunk, and the model's max_tokens cap holds. The server
is the fallback of `engine: llamacpp` (tests/pythonserver.py forces it): llama-server sends
its own usage chunk.

A real local job (`mt submit` → wrapper → front → engine), the real `mt gateway`, the real
``openai`` client: the same path as tests/test_e2e_local.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mtcli import (
    GEMMA,
    PYTHON_SERVER_ARGS,
    gemma_models_yaml,
    owner_key,
    ready_job,
    running_gateway,
)
from pythonserver import python_server_only  # noqa: F401 - the fixture

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

CAP = 6


@pytest.mark.usefixtures("python_server_only")
def test_usage_chunk_and_max_tokens_cap_with_the_real_engine(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    limits = f"    limits: {{max_tokens_default: 4, max_tokens_cap: {CAP}}}\n"
    models = gemma_models_yaml(
        tmp_path / "models.yaml", gemma_gguf, extra=limits, engine_args=PYTHON_SERVER_ARGS
    )
    monkeypatch.setenv("MT_MODELS", str(models))
    with running_gateway() as gateway_url, ready_job(GEMMA):
        client = openai.OpenAI(base_url=gateway_url + "/v1", api_key=owner_key())
        deadline = time.monotonic() + 10
        while GEMMA not in [m.id for m in client.models.list().data]:
            assert time.monotonic() < deadline, "the gateway never listed the ready model"
            time.sleep(0.2)
        messages = [{"role": "user", "content": "Write a long story about a dragon."}]

        # The engine's own usage of a whole answer: the cap held (asked for 200).
        whole = client.chat.completions.create(
            model=GEMMA,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=200,
            temperature=0,
        )
        assert whole.usage is not None
        assert 0 < whole.usage.completion_tokens <= CAP
        # No max_tokens at all: the model's default (4).
        short = client.chat.completions.create(
            model=GEMMA,
            messages=messages,  # type: ignore[arg-type]
            temperature=0,
        )
        assert short.usage is not None
        assert 0 < short.usage.completion_tokens <= 4

        stream = client.chat.completions.create(
            model=GEMMA,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=200,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    with_text = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert with_text, chunks
    usage = chunks[-1].usage
    assert usage is not None, "no usage chunk came"
    assert chunks[-1].choices == []
    # Counted from the stream: one token per event with text, within the cap.
    assert usage.completion_tokens == len(with_text)
    assert usage.completion_tokens <= CAP
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
