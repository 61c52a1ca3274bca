"""Open WebUI, as users run it, against `mt gateway` and a real llama-server job: its API lists
the gateway's models (an on-demand one at zero too) and streams a chat; then Debian's
chromium, headless, driven by npm's playwright-core: open the UI, pick the model, send a
prompt, see the answer. Open WebUI is configured with what `mt export openwebui` writes.

One real job (llama.cpp's own llama-server, MT_LLAMA_SERVER, Gemma 3 270M, ``--jinja``), one
gateway and one Open WebUI serve the module: starting them is most of its time. Open WebUI
(MT_OPENWEBUI: its own venv, made by ``make openwebui`` without the CUDA torch), chromium
(/usr/bin/chromium) and playwright-core (MT_PLAYWRIGHT) are real parts: skipped without them,
failures when MT_TEST_REQUIRE names ``openwebui`` or ``chromium``.

Open WebUI sends no ``max_tokens`` and ~40 tools with every chat, and after it a title, tags
and follow-ups request: the model's ``limits:`` give each a default, which the gateway's access
log shows (``output_limit``). The browser's answer must be the one Open WebUI stored for the
chat (a wrong answer path fails); the browser's steps are retried, and waits are generous.

``MT_OPENWEBUI_SCREENSHOT=PATH`` keeps the browser's screenshot there (docs/img/openwebui.png
was made that way); otherwise it goes to the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtcli import (
    CLIENT_ENV_CLEARED,
    GEMMA,
    llama_server_binary,
    llama_server_home,
    mt,
    owner_key,
    ready_job,
    running_gateway,
)
from realparts import missing_part

# Read at import, before tests/conftest.py's autouse fixture clears MT_*.
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")
OPENWEBUI = os.environ.get("MT_OPENWEBUI", "")
PLAYWRIGHT = os.environ.get("MT_PLAYWRIGHT", "")
SCREENSHOT = os.environ.get("MT_OPENWEBUI_SCREENSHOT", "")
CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path(__file__).parent / "clients" / "openwebui_browser.js"

ON_DEMAND = "gemma-3-270m-on-demand"
DEFAULT_MAX_TOKENS = 48
PROMPT = "What is the capital of France?"
# Open WebUI's own settings for a test run: loopback only, nothing fetched or reported, no
# local embedding model (so torch, left out of its venv, is never imported).
_OPENWEBUI_ENV = {
    "WEBUI_AUTH": "false",
    "OFFLINE_MODE": "true",
    "HF_HUB_OFFLINE": "1",
    "ENABLE_OLLAMA_API": "false",
    "RAG_EMBEDDING_ENGINE": "openai",
    "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
    "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
    "WHISPER_MODEL_AUTO_UPDATE": "false",
    "ENABLE_VERSION_UPDATE_CHECK": "false",
    "ANONYMIZED_TELEMETRY": "false",
    "DO_NOT_TRACK": "true",
    "SCARF_NO_ANALYTICS": "true",
}

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Gateway:
    """The module's gateway: its URL, the owner's key, its JSON log."""

    url: str
    key: str
    log: Path

    def requests(self, path: str) -> list[dict[str, Any]]:
        """The access log's lines for ``path`` so far."""
        lines = [json.loads(ln) for ln in self.log.read_text().splitlines() if ln.startswith("{")]
        return [r for r in lines if r.get("msg") == "request" and r.get("path") == path]


@dataclass(frozen=True)
class OpenWebUI:
    """The module's Open WebUI: its URL and an API token from its sign-in."""

    url: str
    token: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _call(url: str, token: str | None = None, body: object = None, timeout: float = 120) -> Any:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def _models_yaml(gguf: Path) -> str:
    weights = f"{{source: {json.dumps(str(gguf))}}}"
    limits = f"{{max_tokens_default: {DEFAULT_MAX_TOKENS}, max_tokens_cap: 256}}"
    return (
        "models:\n"
        f"  - name: {GEMMA}\n    engine: llamacpp\n    weights: {weights}\n"
        # --jinja: tool calls through the GGUF's template (Open WebUI sends its tools with
        # native function calling); room for its prompt with them.
        '    engine_args: ["--jinja", "--ctx-size", "8192"]\n'
        f"    startup_timeout_s: 120\n    limits: {limits}\n"
        f"  - name: {ON_DEMAND}\n    engine: llamacpp\n    weights: {weights}\n"
        "    on_demand: {idle_ttl_s: 60}\n"
    )


@pytest.fixture(scope="module")
def openwebui_command() -> Path:
    """Open WebUI's command in its own venv: checked before any engine starts."""
    command = Path(OPENWEBUI) if OPENWEBUI else None
    if command is None or not os.access(command, os.X_OK):
        missing_part("openwebui", f"MT_OPENWEBUI={OPENWEBUI!r} (make openwebui installs it)")
        raise AssertionError("unreachable")
    return command


@pytest.fixture(scope="module")
def gateway(
    openwebui_command: Path, gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """One real llama-server job, ready, an on-demand model at zero, and `mt gateway` (for
    Open WebUI: its command is checked first)."""
    binary = llama_server_binary(LLAMA_SERVER)
    root = tmp_path_factory.mktemp("openwebui-gateway")
    with llama_server_home(root, binary, _models_yaml(gemma_gguf)):
        log = root / "gateway.log"
        with ready_job(GEMMA), running_gateway(stderr_path=log) as url:
            yield Gateway(url, owner_key(), log)


def _exported_environment(gateway: Gateway, out: Path) -> dict[str, str]:
    """The environment `mt export openwebui` gives Open WebUI, ``${MT_API_KEY}`` filled in as
    Compose would."""
    mt("export", "openwebui", "--gateway-url", gateway.url, "-o", str(out))
    environment = yaml.safe_load(out.read_text())["services"]["open-webui"]["environment"]
    assert environment["OPENAI_API_KEYS"] == "${MT_API_KEY}"  # a reference, never the key
    environment["OPENAI_API_KEYS"] = gateway.key
    return {str(k): str(v) for k, v in environment.items()}


@pytest.fixture(scope="module")
def openwebui(
    openwebui_command: Path, gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OpenWebUI]:
    """Open WebUI from its own venv, configured by `mt export openwebui`, signed in."""
    command = openwebui_command
    root = tmp_path_factory.mktemp("openwebui")
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_ENV_CLEARED)}
    env.update(_OPENWEBUI_ENV)
    env.update(_exported_environment(gateway, root / "docker-compose.override.yml"))
    env.update(
        DATA_DIR=str(root / "data"),
        HOME=str(root),
        WEBUI_SECRET_KEY=secrets.token_urlsafe(32),
        PATH=f"{command.parent}:{os.environ['PATH']}",
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "openwebui.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(
        [str(command), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300  # a liveness bound for a cold start, not a measure
        while True:
            if proc.poll() is not None:
                pytest.fail(f"open-webui exited {proc.returncode}: {_tail(root / 'openwebui.log')}")
            try:
                if _call(url + "/health", timeout=5).get("status") is True:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"open-webui never became healthy: {_tail(root / 'openwebui.log')}")
            time.sleep(1)
        # Even with WEBUI_AUTH=false its API wants a token: an empty sign-in returns one.
        signed_in = _call(url + "/api/v1/auths/signin", body={"email": "", "password": ""})
        yield OpenWebUI(url, signed_in["token"])
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)
        log.close()


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stream(webui: OpenWebUI, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST /api/chat/completions with ``stream: true``: the SSE events' JSON, in order."""
    request = urllib.request.Request(  # noqa: S310 - loopback
        webui.url + "/api/chat/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {webui.token}", "Content-Type": "application/json"},
    )
    events: list[dict[str, Any]] = []
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: ") :]))
    return events


def test_openwebui_lists_the_gateways_models_and_streams_a_chat(
    gateway: Gateway, openwebui: OpenWebUI
) -> None:
    models = _call(openwebui.url + "/api/models", openwebui.token)["data"]
    ids = {m["id"] for m in models}
    assert {GEMMA, ON_DEMAND} <= ids, ids  # the on-demand model at zero is listed too
    before = len(gateway.requests("/v1/chat/completions"))
    events = _stream(openwebui, {"model": GEMMA, "messages": [{"role": "user", "content": PROMPT}]})
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events
        for choice in event.get("choices", [])
    )
    chunks = [e for e in events if e.get("choices")]
    assert len(chunks) > 1, events  # streamed, not one block
    assert text.strip(), events
    served = gateway.requests("/v1/chat/completions")[before:]
    assert served, "Open WebUI's chat never reached the gateway"
    assert all(r["status"] == 200 and r["model"] == GEMMA for r in served), served
    # Open WebUI sent no max_tokens: the model's limits gave it the default.
    assert served[0]["output_limit"] == f"default {DEFAULT_MAX_TOKENS}", served[0]


def _stored_answer(webui: OpenWebUI) -> dict[str, Any]:
    """The browser chat's assistant message as Open WebUI saved it (the page saves the chat
    just after the stream ends: polled, with a liveness bound)."""
    deadline = time.monotonic() + 120
    while True:
        chats = _call(webui.url + "/api/v1/chats/", webui.token)
        if chats:
            chat = _call(webui.url + f"/api/v1/chats/{chats[0]['id']}", webui.token)["chat"]
            history = chat.get("history", {})
            message = history.get("messages", {}).get(history.get("currentId") or "", {})
            if message.get("role") == "assistant" and message.get("done"):
                return dict(message)
        assert time.monotonic() < deadline, f"the browser's chat was not saved: {chats}"
        time.sleep(1)


def _screenshot_path(tmp_path: Path) -> Path:
    return Path(SCREENSHOT) if SCREENSHOT else tmp_path / "openwebui.png"


def test_a_browser_picks_the_model_and_sees_the_answer(
    gateway: Gateway, openwebui: OpenWebUI, tmp_path: Path
) -> None:
    if not CHROMIUM.is_file():
        missing_part("chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    if not PLAYWRIGHT or not Path(PLAYWRIGHT).is_dir():
        missing_part("chromium", f"MT_PLAYWRIGHT={PLAYWRIGHT!r} (make openwebui installs it)")
    node = shutil.which("node")
    if node is None:
        missing_part("chromium", "node is not on PATH (apt-get install nodejs)")
        raise AssertionError("unreachable")
    screenshot = _screenshot_path(tmp_path)
    before = len(gateway.requests("/v1/chat/completions"))
    args = {
        "playwright": PLAYWRIGHT,
        "url": openwebui.url,
        "model": GEMMA,
        "prompt": PROMPT,
        "screenshot": str(screenshot),
    }
    done = subprocess.run(
        [node, str(DRIVER), json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])["answer"]
    assert answer, done.stderr
    assert screenshot.stat().st_size > 0
    # The answer on the page is the one Open WebUI stored for this chat (from the model
    # picked), and that chat's completion went through the gateway.
    stored = _stored_answer(openwebui)
    assert stored["model"] == GEMMA, stored
    assert " ".join(stored["content"].split()) == " ".join(answer.split())
    served = gateway.requests("/v1/chat/completions")[before:]
    assert any(r["status"] == 200 and r["model"] == GEMMA for r in served), served
