"""Helpers for swap pool tests: a models.yaml with the real Gemma under two names, the pool's
status (asked with its job's key, as the gateway and `mt pool status` do), engine lookups."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from jobclient import job_get
from mtcli import is_llamacpp_engine, owner_key

from hpc.registry import Record, Registry

# The same GGUF under two names with different settings: each is its own engine.
MODEL_A = "gemma-a"
MODEL_B = "gemma-b"
N_CTX = {MODEL_A: "1024", MODEL_B: "512"}


def pool_models_yaml(
    path: Path, gguf: Path, pool: dict[str, Any], extra: tuple[dict[str, Any], ...] = ()
) -> Path:
    """Models A and B (the real Gemma), ``extra`` models and one pool; JSON lines are YAML."""
    models = [
        {
            "name": name,
            "engine": "llamacpp",
            "weights": {"source": str(gguf)},
            "engine_args": ["--ctx-size", n_ctx],
            "startup_timeout_s": 120,
        }
        for name, n_ctx in N_CTX.items()
    ] + list(extra)
    lines = ["models:"] + [f"  - {json.dumps(m)}" for m in models]
    lines += ["pools:", f"  - {json.dumps(pool)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def registry() -> Registry:
    """The test's registry (under its private MT_HOME)."""
    return Registry(Path(os.environ["MT_HOME"]) / "registry")


def pool_record(key: str) -> Record:
    """The pool's stored record (with its key)."""
    record = registry().read(key)
    assert record is not None, key
    return record


def pool_status(record: Record) -> dict[str, Any]:
    """``GET /pool/status`` of the pool, with its job's key."""
    status, body = job_get(record, "/pool/status", record.api_key.get_secret_value())
    assert status == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def slot_of(status: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The slot holding ``model`` (any state), or None."""
    return next((s for s in status["slots"] if s["model"] == model), None)


def loads_of(status: dict[str, Any], model: str) -> int:
    """How many times the pool has loaded ``model``."""
    return int(next(c["loads"] for c in status["catalogue"] if c["model"] == model))


def engine_cmdline(pid: int) -> list[str]:
    """The command line of an engine the pool started."""
    return list(psutil.Process(pid).cmdline())


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def engines_of(pool_pid: int, model: str) -> list[psutil.Process]:
    """The pool's engine processes serving ``model`` (by their --alias)."""
    found = []
    for proc in psutil.Process(pool_pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.NoSuchProcess:
            continue
        if is_llamacpp_engine(cmdline) and model in cmdline:
            found.append(proc)
    return found


def ask(base_url: str, model: str, *, stream: bool = False) -> tuple[str, str]:
    """One chat request through the official openai client: (model it answered as, text)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=owner_key(), max_retries=0, timeout=180)
    messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, stream=True
        )
        pieces, answered = [], ""
        for chunk in chunks:
            answered = chunk.model
            pieces += [c.delta.content or "" for c in chunk.choices]
        return answered, "".join(pieces)
    reply = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0
    )
    return reply.model, reply.choices[0].message.content or ""


def alternate_and_check(url: str, record: Record) -> dict[str, Any]:
    """A, B, A through ``url`` on a one-slot pool: each answers, each swap starts a new engine.

    Returns the pool's status after the last request.
    """
    pids = []
    status: dict[str, Any] = {}
    for turn, model in enumerate([MODEL_A, MODEL_B, MODEL_A]):
        answered, text = ask(url, model, stream=turn == 1)
        assert answered == model and text.strip()
        status = pool_status(record)
        [slot] = status["slots"]
        assert (slot["model"], slot["state"], slot["loads"]) == (model, "ready", turn + 1)
        # The engine that answered is the one started for this name, with its settings.
        cmdline = engine_cmdline(slot["engine_pid"])
        assert cmdline[cmdline.index("--ctx-size") + 1] == N_CTX[model]
        pids.append(slot["engine_pid"])
    assert len(set(pids)) == 3, pids  # every swap stopped one engine and started another
    assert not is_running(pids[0])
    assert (loads_of(status, MODEL_A), loads_of(status, MODEL_B)) == (2, 1)
    return status


def is_running(pid: int) -> bool:
    """True if ``pid`` runs and is no zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def listed(url: str, *names: str) -> bool:
    """True once the gateway at ``url`` lists every one of ``names``."""
    import openai

    shown = [m.id for m in openai.OpenAI(base_url=url, api_key=owner_key()).models.list().data]
    return all(name in shown for name in names)
