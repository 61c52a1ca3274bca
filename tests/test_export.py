"""`mt export`: golden snippets that parse and name the gateway and the models, never a key,
and the LiteLLM round trip for real: LiteLLM's proxy → `mt gateway` → an engine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtcli import mt, running_gateway
from pydantic import SecretStr
from realengine import BareEngine
from realparts import missing_part

from hpc.catalog import Endpoint, ServedModel, served_models
from hpc.export import TOOLS, ExportError, Tool, api_url, job_key_env, render
from hpc.registry import Record
from hpc.spec import ModelsFile

GOLDEN = Path(__file__).parent / "golden" / "export"
UPDATE = os.environ.get("MT_UPDATE_GOLDEN") == "1"  # read before the env is cleaned
# `make test` installs LiteLLM's proxy into its own venv and names its command here, so the
# round trip runs without LiteLLM in the project's venv (read before the env is cleaned).
LITELLM = os.environ.get("MT_LITELLM", "")
GATEWAY = "http://login1.cluster.example:8081/v1"
JOB_KEY = "mtj-this-per-job-key-must-never-be-exported"
REPO = Path(__file__).resolve().parent.parent

MODELS = ModelsFile.model_validate(
    {
        "models": [
            {"name": "gemma-3-270m", "engine": "llamacpp", "weights": {"source": "/m.gguf"}},
            {
                "name": "llama-3.1-8b",
                "engine": "vllm",
                "weights": {"source": "org/llama"},
                "aliases": ["llama"],
            },
        ],
        "static": [
            {"name": "shared", "base_url": "http://10.0.0.5:8000/v1", "api_key_env": "SHARED_KEY"}
        ],
    }
)


def _record(model: str, job_id: str, port: int, state: str = "ready") -> Record:
    return Record.model_validate(
        {
            "backend": "slurm",
            "job_id": job_id,
            "nonce": "ab12cd34",
            "model": model,
            "engine": "vllm",
            "state": state,
            "base_url": f"http://gpu1:{port}/v1",
            "api_key": SecretStr(JOB_KEY),
        }
    )


def served() -> list[ServedModel]:
    """Two configured models (one running twice, one not, the running one with an alias), a
    static backend, a job-only name."""
    records = [
        _record("llama-3.1-8b", "101", 8001),
        _record("llama-3.1-8b", "102", 8002),
        _record("llama-3.1-8b", "103", 8003, state="starting"),
        _record("qwen-7b", "104", 8004),
    ]
    return served_models(MODELS, records)


NAMES = ["gemma-3-270m", "llama-3.1-8b", "shared", "qwen-7b", "llama"]
CASES: list[tuple[Tool, bool]] = [(tool, False) for tool in TOOLS] + [("litellm", True)]


def _case_id(case: tuple[Tool, bool]) -> str:
    return f"{case[0]}-direct" if case[1] else case[0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_golden(case: tuple[Tool, bool]) -> None:
    tool, direct = case
    text = render(tool, served(), gateway_url=GATEWAY, direct=direct).text
    path = GOLDEN / f"{_case_id(case)}.yaml"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_no_key_is_ever_written(case: tuple[Tool, bool]) -> None:
    text = render(case[0], served(), gateway_url=GATEWAY, direct=case[1]).text
    assert JOB_KEY not in text
    assert "mtj-" not in text


def _gateway_urls(tool: Tool, doc: dict[str, Any]) -> list[str]:
    """Where each tool's document names the OpenAI root it sends requests to."""
    if tool == "litellm":
        return [m["litellm_params"]["api_base"] for m in doc["model_list"]]
    if tool == "librechat":
        return [e["baseURL"] for e in doc["endpoints"]["custom"]]
    if tool == "openwebui":
        return doc["services"]["open-webui"]["environment"]["OPENAI_API_BASE_URLS"].split(";")
    if tool == "llamastack":
        return [p["config"]["base_url"] for p in doc["providers"]["inference"]]
    return [p["url"] for p in doc["spec"]["llm"]["providers"]]


def _model_names(tool: Tool, doc: dict[str, Any]) -> list[str]:
    if tool == "litellm":
        return [m["model_name"] for m in doc["model_list"]]
    if tool == "librechat":
        return list(doc["endpoints"]["custom"][0]["models"]["default"])
    if tool == "openwebui":
        # Open WebUI lists models from the gateway's /v1/models; the snippet names the default.
        return [doc["services"]["open-webui"]["environment"]["DEFAULT_MODELS"]]
    if tool == "llamastack":
        return [m["model_id"] for m in doc["registered_resources"]["models"]]
    return [m["name"] for m in doc["spec"]["llm"]["providers"][0]["models"]]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("gateway", [GATEWAY, "http://h:1/x'y\"z:&{a}*b"])
def test_snippet_parses_and_names_gateway_and_models(tool: Tool, gateway: str) -> None:
    doc = yaml.safe_load(render(tool, served(), gateway_url=gateway).text)
    assert set(_gateway_urls(tool, doc)) == {api_url(gateway)}
    names = _model_names(tool, doc)
    assert names == (NAMES[:1] if tool == "openwebui" else NAMES)


def test_litellm_keys_are_environment_references() -> None:
    doc = yaml.safe_load(render("litellm", served(), gateway_url=GATEWAY, key_env="LAB_KEY").text)
    assert {m["litellm_params"]["api_key"] for m in doc["model_list"]} == {"os.environ/LAB_KEY"}
    assert {m["litellm_params"]["model"] for m in doc["model_list"]} == {
        f"openai/{n}" for n in NAMES
    }
    assert doc["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"


def test_litellm_direct_routes_each_ready_endpoint_under_its_name() -> None:
    exported = render("litellm", served(), gateway_url=GATEWAY, direct=True)
    doc = yaml.safe_load(exported.text)
    entries = [
        (m["model_name"], m["litellm_params"]["api_base"], m["litellm_params"]["api_key"])
        for m in doc["model_list"]
    ]
    assert entries == [
        ("llama-3.1-8b", "http://gpu1:8001/v1", f"os.environ/{job_key_env('slurm-101')}"),
        ("llama-3.1-8b", "http://gpu1:8002/v1", f"os.environ/{job_key_env('slurm-102')}"),
        ("shared", "http://10.0.0.5:8000/v1", "os.environ/SHARED_KEY"),
        ("qwen-7b", "http://gpu1:8004/v1", f"os.environ/{job_key_env('slurm-104')}"),
        ("llama", "http://gpu1:8001/v1", f"os.environ/{job_key_env('slurm-101')}"),
        ("llama", "http://gpu1:8002/v1", f"os.environ/{job_key_env('slurm-102')}"),
    ]
    # An alias goes straight to the engine, which knows only the model's own name.
    models = {m["model_name"]: m["litellm_params"]["model"] for m in doc["model_list"]}
    assert models["llama"] == "openai/llama-3.1-8b"
    assert job_key_env("slurm-101") == "MT_JOB_KEY_SLURM_101"
    assert exported.skipped == ("gemma-3-270m",)  # nothing serves it now: named, not routed
    assert "# not exported (no ready endpoint): gemma-3-270m" in exported.text


def test_litellm_direct_refuses_a_job_behind_its_tls_front() -> None:
    """A job's front has a certificate only its record vouches for: the gateway pins it,
    LiteLLM cannot, so --direct says so rather than writing a config that fails on TLS."""
    pinned = _record("llama-3.1-8b", "105", 8005).model_copy(
        update={"base_url": "https://gpu1:8005/v1", "tls_sha256": "ab" * 32}
    )
    model = ServedModel(
        name="llama-3.1-8b",
        source="models.yaml",
        engine="vllm",
        endpoints=(Endpoint(pinned.base_url or "", job=pinned.key, record=pinned),),
    )
    with pytest.raises(ExportError, match="LiteLLM cannot pin") as raised:
        render("litellm", [model], gateway_url=GATEWAY, direct=True)
    assert raised.value.hint is not None and "without --direct" in raised.value.hint


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/v1"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081/v1"),
        ("https://llm.example.org/v1/", "https://llm.example.org/v1"),
        ("http://[::1]:8081/v1", "http://[::1]:8081/v1"),
    ],
)
def test_api_url(given: str, expected: str) -> None:
    assert api_url(given) == expected


@pytest.mark.parametrize(
    "bad", ["127.0.0.1:8081", "http://h:1/v1\nmaster_key: leaked", "ftp://h/v1", "http://"]
)
def test_bad_gateway_url_is_refused(bad: str) -> None:
    with pytest.raises(ExportError, match="not a gateway URL"):
        render("litellm", served(), gateway_url=bad)


@pytest.mark.parametrize("bad", ["MT KEY", "1KEY", "KEY}\nx", "${KEY}"])
def test_bad_key_env_is_refused(bad: str) -> None:
    with pytest.raises(ExportError, match="not an environment variable name"):
        render("librechat", served(), gateway_url=GATEWAY, key_env=bad)


def test_nothing_to_export_is_an_error() -> None:
    with pytest.raises(ExportError, match="no models to export"):
        render("olsconfig", [], gateway_url=GATEWAY)
    with pytest.raises(ExportError, match="no ready endpoint"):
        render(
            "litellm",
            served_models(MODELS.model_copy(update={"static": ()}), []),
            gateway_url=GATEWAY,
            direct=True,
        )


def _models_yaml(tmp_path: Path, engine_url: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(
        "static:\n"
        "  - name: chat\n"
        f"    base_url: {json.dumps(engine_url)}\n"
        "    api_key_env: ENGINE_KEY\n",
        encoding="utf-8",
    )
    return path


def test_cli_writes_a_private_file_and_refuses_direct_for_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_models_yaml(tmp_path, "http://127.0.0.1:9/v1")))
    out = tmp_path / "it's here; echo" / "litellm.yaml"
    done = mt("export", "litellm", "--gateway-url", "http://gw:8081", "-o", str(out))
    assert f"wrote litellm config to {out}" in " ".join(done.stderr.split())
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    doc = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert doc["model_list"][0]["litellm_params"]["api_base"] == "http://gw:8081/v1"

    shown = mt("export", "olsconfig").stdout  # default: site.yaml's gateway, 127.0.0.1:8081
    assert yaml.safe_load(shown)["spec"]["llm"]["providers"][0]["url"] == "http://127.0.0.1:8081/v1"

    refused = mt("export", "openwebui", "--direct", check=False)
    assert refused.returncode == 2
    assert "--direct is for litellm only" in refused.stderr

    bad = mt("export", "litellm", "--gateway-url", "gw:8081", check=False)
    assert bad.returncode == 1
    assert "error: not a gateway URL" in bad.stderr and "hint:" in bad.stderr


# --- the LiteLLM round trip -------------------------------------------------------------


def litellm_command() -> Path:
    """LiteLLM's `litellm` command: $MT_LITELLM (`make test` sets it), else next to this Python.

    Without either, the round trip skips (LiteLLM is not a ModelTainer dependency), or fails
    when MT_TEST_REQUIRE names ``litellm`` (.ci/run does). A set MT_LITELLM that points at
    nothing runnable always fails: a typo must not turn the test into a skip.
    """
    if LITELLM:
        command = Path(LITELLM)
        assert command.is_file() and os.access(command, os.X_OK), (
            f"MT_LITELLM={LITELLM} is not an executable file (make test installs it)"
        )
        return command
    beside = Path(sys.executable).parent / "litellm"
    if not beside.is_file():
        missing_part(
            "litellm",
            "no `litellm` command: run `make test` (it installs LiteLLM's proxy into its own "
            "venv and sets MT_LITELLM), or set MT_LITELLM to a `litellm` command",
        )
    return beside


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def _background(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[str]]:
    """A server in its own session, stopped (its whole group) when the block ends."""
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=sink,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            if proc.stdout is not None:
                proc.stdout.close()


@contextmanager
def litellm_proxy(config: Path, env: dict[str, str], log: Path) -> Iterator[str]:
    """`litellm --config FILE` on a free loopback port; yields its OpenAI root once it is up."""
    port = _free_port()
    argv = [str(litellm_command()), "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    # No network here: LiteLLM's bundled cost map, no telemetry.
    env = {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    env |= {"DISABLE_SCHEMA_UPDATE": "True", "LITELLM_LOG": "ERROR"}
    with _background(argv, env, log) as proc:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"LiteLLM exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"LiteLLM never came up:\n{log.read_text()[-3000:]}"
            url = f"http://127.0.0.1:{port}/health/liveliness"
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"


def _ask(base_url: str, key: str) -> int:
    """One chat completion through ``base_url``: the completion tokens it reports (the
    engine is a base model: its words say nothing)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model="chat",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=5,
    )
    assert answer.usage is not None
    return answer.usage.completion_tokens


@pytest.mark.litellm
@pytest.mark.llamacpp
@pytest.mark.timeout(300)
@pytest.mark.parametrize("direct", [False, True], ids=["via-gateway", "direct"])
def test_litellm_round_trip(
    direct: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """LiteLLM's real proxy, started with the exported config, answers a chat completion:
    through `mt gateway` (which adds the engine's key) or, with --direct, straight to it."""
    litellm_command()  # skips (or fails under MT_TEST_REQUIRE) before anything starts
    bare_engine: BareEngine = request.getfixturevalue("bare_engine")
    engine_key = bare_engine.key
    master_key = "sk-litellm-master-for-this-test"
    # The session's bare llama-server stands where a static backend's engine runs.
    monkeypatch.setenv("MT_MODELS", str(_models_yaml(tmp_path, bare_engine.base_url)))
    monkeypatch.setenv("ENGINE_KEY", engine_key)  # the gateway's static backend key
    keys = tmp_path / "keys.yaml"
    client_key = mt("keys", "create", "litellm", "--keys", str(keys)).stdout.strip()
    with running_gateway("--keys", str(keys)) as gateway_url:
        config = tmp_path / "litellm.yaml"
        args = ["export", "litellm", "--gateway-url", gateway_url, "-o", str(config)]
        mt(*args, *(["--direct"] if direct else []))
        text = config.read_text(encoding="utf-8")
        assert engine_key not in text and client_key not in text
        # The keys reach LiteLLM only through the environment the config names.
        env = {k: v for k, v in os.environ.items() if k != "ENGINE_KEY"}
        env |= {"LITELLM_MASTER_KEY": master_key}
        env |= {"ENGINE_KEY": engine_key} if direct else {"MT_API_KEY": client_key}
        with litellm_proxy(config, env, tmp_path / "litellm.log") as proxy_url:
            completion_tokens = _ask(proxy_url, master_key)
    assert completion_tokens > 0, "LiteLLM answered with no tokens"
