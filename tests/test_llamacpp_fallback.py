"""llama-cpp-python's server, the supported fallback of `engine: llamacpp`, for real.

With no llama-server on the PATH and none built into the home's cache (tests/pythonserver.py),
`mt submit` on the local backend runs llama-cpp-python's server through
hpc.job.llamacpp_python on the job's Unix socket: the job becomes ready, the real `openai`
client streams through `mt gateway`, `mt cancel` leaves no process. The flags of one server
given to the other fail at `mt submit` with `error:` naming the flag and a `hint:`, and
nothing is started: never "unrecognized arguments" from inside the job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest
from mtcli import GEMMA, mt, owner_key, ready_job, running_gateway
from pythonserver import python_server_only  # noqa: F401 - the fixture
from test_llama_server import llama_server_first  # noqa: F401 - the fixture

from hpc.registry import Registry

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


def _models(tmp_path: Path, gguf: Path, args: list[str]) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {GEMMA}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        f"    engine_args: {json.dumps(args)}\n"
        "    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    return path


def _registry() -> Registry:
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


@pytest.mark.usefixtures("python_server_only")
def test_the_python_server_serves_a_job_when_no_llama_server_is_found(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    models = _models(tmp_path, gemma_gguf, ["--n_ctx", "1024", "--chat_format", "gemma"])
    monkeypatch.setenv("MT_MODELS", str(models))
    with ready_job(GEMMA) as submitted, running_gateway() as url:
        record = _registry().read(str(submitted["key"]))
        assert record is not None and record.engine_pid is not None
        engine = psutil.Process(record.engine_pid)
        argv = engine.cmdline()
        assert "hpc.job.llamacpp_python" in argv and "--n_ctx" in argv, argv
        assert not any(Path(a).name == "llama-server" for a in argv), argv

        client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key(), max_retries=0)
        stream = client.chat.completions.create(
            model=GEMMA,
            messages=[{"role": "user", "content": "Name a planet."}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one block
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


@pytest.mark.usefixtures("python_server_only")
def test_llama_server_flags_fail_at_submit_on_the_python_server(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_models(tmp_path, gemma_gguf, ["--ctx-size", "1024"])))
    done = mt("submit", GEMMA, "--wait", check=False)
    assert done.returncode == 1, done.stderr
    assert "error: gemma-3-270m: engine_args flag --ctx-size is llama-server's" in done.stderr
    assert "(llama-cpp-python spells it --n_ctx)" in done.stderr
    assert "hint: build ModelTainer's own llama-server once" in done.stderr
    assert "python -m hpc.dev.llama_server" in done.stderr
    assert "unrecognized arguments" not in done.stderr
    assert _registry().records() == []  # nothing submitted, nothing started


def test_python_server_flags_fail_at_submit_on_llama_server(
    request: pytest.FixtureRequest,
    gemma_gguf: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = request.getfixturevalue("llama_server_first")
    models = _models(tmp_path, gemma_gguf, ["--chat_format", "gemma", "--n_ctx", "1024"])
    monkeypatch.setenv("MT_MODELS", str(models))
    done = mt("submit", GEMMA, "--json", check=False)
    assert done.returncode == 1, done.stderr
    assert "error: gemma-3-270m: engine_args flag --chat_format is llama-cpp-python's" in (
        done.stderr
    )
    assert f"runs llama-server found on the PATH ({server})" in done.stderr
    assert "hint: write llama-server's flags" in done.stderr
    assert done.stdout == ""
    assert _registry().records() == []
