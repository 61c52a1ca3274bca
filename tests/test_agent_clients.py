"""The agent and framework clients users run, unmodified, against `mt gateway`: Codex CLI
(``/v1/responses``), Claude Code (``/v1/messages``, with ``x-api-key`` and with a bearer
token) and LlamaStack (``mt export llamastack``'s run config, a chat completion through
LlamaStack's own OpenAI-compatible API).

Each client is the real one from its own cache (`make clients`: MT_CODEX, MT_CLAUDE,
MT_LLAMA_STACK); all traffic stays on 127.0.0.1, and each runs with a scratch HOME and its
telemetry off. One real job (llama.cpp's own llama-server, MT_LLAMA_SERVER, with the Gemma 3
270M GGUF) and one gateway serve the module. The agents send long prompts (Codex ~5k tokens,
Claude Code ~16k) and no output limit or a huge one: the model gets a 24k context in one
slot, and its ``limits:`` in models.yaml give 64 tokens by default and clamp to 64. It is a
base model, so an agent's exit code says little (Claude Code hits output limits and
retries): what is asserted is the gateway's side, its access log, line by line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from mtcli import (
    GEMMA,
    llama_server_binary,
    llama_server_home,
    mt,
    owner_key,
    ready_job,
    running_gateway,
)
from realparts import missing_part

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")
CODEX = os.environ.get("MT_CODEX", "")
CLAUDE = os.environ.get("MT_CLAUDE", "")
LLAMA_STACK = os.environ.get("MT_LLAMA_STACK", "")

pytestmark = [pytest.mark.llamacpp, pytest.mark.clients, pytest.mark.timeout(1500)]

HI = [{"role": "user", "content": "Hello"}]
OUTPUT_CAP = 64
# Claude Code asks for 32000 output tokens, then 128000 when it hits a limit.
_CLEARED = ("MT_", "SLURM_", "OPENAI_", "ANTHROPIC_", "CODEX_", "CLAUDE_")
# A client's whole run: Claude Code makes ~4 calls of ~16k prompt tokens each (~2 min on 2
# free cores; far more on a loaded machine).
_CLIENT_TIMEOUT_S = 1200


@dataclass(frozen=True)
class Served:
    """The module's gateway (URL, owner key, log file) and the MT_HOME and models.yaml."""

    url: str
    key: str
    home: Path
    models: Path
    log: Path
    work: Path  # the agents' working directory: one for all, so their prompts repeat

    def access_lines(self) -> list[dict[str, Any]]:
        """Every access-log line the gateway has written so far, in order."""
        lines = self.log.read_text(encoding="utf-8").splitlines()
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return [e for e in entries if e.get("msg") == "request"]


@pytest.fixture(scope="module")
def served(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real llama-server job with the context the agents need, ready, and `mt gateway`
    in front of it writing its log to a file, for the module."""
    binary = llama_server_binary(LLAMA_SERVER)
    root = tmp_path_factory.mktemp("agent-clients")
    # One slot holds the whole context (llama-server splits --ctx-size among its slots).
    models_yaml = (
        f"models:\n  - name: {GEMMA}\n    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gemma_gguf))}}}\n"
        '    engine_args: ["--ctx-size", "24576", "--parallel", "1"]\n'
        "    startup_timeout_s: 120\n"
        f"    limits: {{max_tokens_default: {OUTPUT_CAP}, max_tokens_cap: {OUTPUT_CAP}}}\n"
    )
    log = root / "gateway.log"
    with (
        llama_server_home(root, binary, models_yaml, cleared=_CLEARED),
        ready_job(GEMMA),
        running_gateway(stderr_path=log) as url,
    ):
        yield Served(url, owner_key(), root / "mt-home", root / "models.yaml", log, root / "work")


def _client(path: str, variable: str) -> Path:
    binary = Path(path) if path else None
    if binary is None or not os.access(binary, os.X_OK):
        missing_part("clients", f"{variable}={path!r} (make clients installs it)")
        raise AssertionError("unreachable")
    return binary


# The clients' fixtures have the module's scope and come before ``served`` in each test's
# arguments: a missing client skips (or fails) its test before the engine starts for it.
@pytest.fixture(scope="module")
def codex() -> Path:
    """Codex CLI's command (MT_CODEX)."""
    return _client(CODEX, "MT_CODEX")


@pytest.fixture(scope="module")
def claude() -> Path:
    """Claude Code's command (MT_CLAUDE)."""
    return _client(CLAUDE, "MT_CLAUDE")


@pytest.fixture(scope="module")
def llama_stack() -> Path:
    """LlamaStack's ``llama`` command (MT_LLAMA_STACK), in its Python 3.12 venv."""
    llama = Path(LLAMA_STACK) if LLAMA_STACK else None
    if llama is None or not os.access(llama, os.X_OK):
        missing_part(
            "llamastack",
            f"MT_LLAMA_STACK={LLAMA_STACK!r}: LlamaStack needs Python 3.12 (make clients "
            "installs it where python3.12 is on PATH or under ~/.pyenv)",
        )
        raise AssertionError("unreachable")
    return llama


def _scratch_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment: a scratch HOME, the system PATH, and ``extra``; nothing else of
    the test's (no key of ours leaks in by accident, no proxy, no user config)."""
    home.mkdir(parents=True, exist_ok=True)
    path = "/usr/local/bin:/usr/bin:/bin"
    node = shutil.which("node")  # Codex's npm entry point is a node script
    if node is not None:
        path = f"{Path(node).parent}:{path}"
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", **extra}


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=_CLIENT_TIMEOUT_S,
        check=False,
    )


def _new_lines(served: Served, before: int, path: str) -> list[dict[str, Any]]:
    return [e for e in served.access_lines()[before:] if e["path"] == path]


def _summary(lines: list[dict[str, Any]]) -> str:
    keys = ("path", "status", "outcome", "output_limit", "duration_ms")
    return json.dumps([{k: e.get(k) for k in keys} for e in lines], indent=1)


def codex_config(base_url: str, model: str, key_env: str) -> str:
    """CODEX_HOME/config.toml: the gateway as a Responses provider; no approvals, a read-only
    sandbox, no analytics or feedback uploads (docs/clients.md shows the same file)."""
    return (
        f'model = "{model}"\n'
        'model_provider = "modeltainer"\n'
        'approval_policy = "never"\n'
        'sandbox_mode = "read-only"\n'
        "\n[model_providers.modeltainer]\n"
        'name = "ModelTainer"\n'
        f'base_url = "{base_url}/v1"\n'
        f'env_key = "{key_env}"\n'
        'wire_api = "responses"\n'
        "\n[analytics]\nenabled = false\n"
        "\n[feedback]\nenabled = false\n"
    )


def test_codex_exec_speaks_responses_through_the_gateway(
    codex: Path, served: Served, tmp_path: Path
) -> None:
    codex_home = tmp_path / "codex-home"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        codex_config(served.url, GEMMA, "MT_API_KEY"), encoding="utf-8"
    )
    env = _scratch_env(tmp_path / "home", CODEX_HOME=str(codex_home), MT_API_KEY=served.key)
    before = len(served.access_lines())
    argv = [str(codex), "exec", "--skip-git-repo-check", "--ephemeral", "Say hello."]
    done = _run(argv, env, served.work)
    lines = _new_lines(served, before, "/v1/responses")
    assert done.returncode == 0, done.stderr[-3000:] + _summary(lines)
    assert lines, done.stderr[-3000:]
    assert all(e["status"] == 200 for e in lines), _summary(lines)
    # Codex sends no output limit: the model's default applies.
    assert all(e["output_limit"] == f"default {OUTPUT_CAP}" for e in lines), _summary(lines)
    assert all(e["client"] == "owner" for e in lines)


@pytest.mark.parametrize("key_variable", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
def test_claude_code_print_mode_speaks_messages_through_the_gateway(
    claude: Path, served: Served, tmp_path: Path, key_variable: str
) -> None:
    env = _scratch_env(
        tmp_path / "home",
        ANTHROPIC_BASE_URL=served.url,
        DISABLE_TELEMETRY="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        # Its background calls use a "small fast" model: the same one here.
        ANTHROPIC_DEFAULT_HAIKU_MODEL=GEMMA,
        **{key_variable: served.key},
    )
    before = len(served.access_lines())
    # The same directory (and so the same system prompt) for both runs: the engine's prompt
    # cache holds the first run's ~16k tokens for the second.
    done = _run([str(claude), "-p", "Say hello.", "--model", GEMMA], env, served.work)
    every = served.access_lines()[before:]
    lines = [e for e in every if e["path"].startswith("/v1/messages")]
    assert lines, f"exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert all(e["status"] == 200 for e in lines), _summary(every)
    assert all(e["client"] == "owner" for e in lines)  # the key came in the header asked for
    # It asks for 32000 (then 128000) output tokens: clamped to the model's cap.
    asked = [e["output_limit"] for e in lines if e["path"] == "/v1/messages"]
    assert asked, _summary(every)
    clamped = [a for a in asked if str(a).startswith("clamped ")]
    assert clamped == asked, asked
    assert all(str(a).endswith(f" to {OUTPUT_CAP}") for a in asked), asked
    assert not [e for e in every if e["status"] >= 400], _summary(every)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listed(url: str) -> list[str]:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as response:  # noqa: S310
            return [m["id"] for m in json.loads(response.read())["data"]]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return []


def test_llamastack_runs_the_exported_config_and_chats_through_the_gateway(
    llama_stack: Path, served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_HOME", str(served.home))
    monkeypatch.setenv("MT_MODELS", str(served.models))
    config = tmp_path / "run.yaml"
    mt("export", "llamastack", "--gateway-url", served.url, "-o", str(config))
    port = _free_port()
    env = _scratch_env(
        tmp_path / "home", MT_API_KEY=served.key, SQLITE_STORE_DIR=str(tmp_path / "store")
    )
    log = (tmp_path / "llama-stack.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [str(llama_stack), "stack", "run", str(config), "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack = f"http://127.0.0.1:{port}"
    name = f"modeltainer/{GEMMA}"  # LlamaStack names a model <provider>/<its id>
    try:
        deadline = time.monotonic() + 180
        while name not in _listed(stack):
            assert proc.poll() is None, (tmp_path / "llama-stack.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "llama-stack.log").read_text()[-3000:]
            time.sleep(0.5)
        before = len(served.access_lines())
        client = openai.OpenAI(base_url=stack + "/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=name, messages=HI, max_tokens=8)
        assert reply.choices[0].message.role == "assistant"
        assert reply.usage is not None
        assert 0 < reply.usage.completion_tokens <= 8
        stream = client.chat.completions.create(
            model=name,
            messages=HI,
            max_tokens=8,
            stream=True,
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices]
        assert len(pieces) > 1  # streamed, not one block
        lines = _new_lines(served, before, "/v1/chat/completions")
        assert [e["status"] for e in lines] == [200, 200], _summary(lines)
        assert {e["model"] for e in lines} == {GEMMA}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
