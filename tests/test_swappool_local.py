"""A swap pool under the local backend with the real Gemma model under two names.

`mt submit <pool>` starts `python -m hpc.job.swappool`; the real gateway routes both names to it;
the official openai client asks. Nothing is faked: the engines are llama.cpp servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from jobclient import job_openai
from mtcli import mt, running_gateway
from poolhelpers import (
    MODEL_A,
    MODEL_B,
    alternate_and_check,
    engines_of,
    is_running,
    listed,
    loads_of,
    pool_models_yaml,
    pool_record,
    pool_status,
    slot_of,
    wait_for,
)
from streams import start_stream

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


@pytest.fixture
def one_slot_pool(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pool = {"name": "gemma-pool", "models": [MODEL_A, MODEL_B], "slots": 1}
    path = pool_models_yaml(tmp_path / "models.yaml", gemma_gguf, pool)
    monkeypatch.setenv("MT_MODELS", str(path))
    record = json.loads(mt("submit", "gemma-pool", "--wait", "--json").stdout)
    assert record["state"] == "ready"
    assert record["engine"] == "pool" and record["model"] == "gemma-pool"
    assert record["serves"] == [MODEL_A, MODEL_B]
    key: str = record["key"]
    yield key
    mt("cancel", key, check=False)


def test_alternating_requests_swap_one_slot(one_slot_pool: str) -> None:
    record = pool_record(one_slot_pool)
    assert pool_status(record)["slots"][0]["state"] == "empty"
    with running_gateway() as gateway:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, MODEL_A, MODEL_B), 15)
        alternate_and_check(url, record)

        # Text and JSON of `mt pool status` show the same pool.
        shown = json.loads(mt("pool", "status", "--json").stdout)
        [pool] = shown["pools"]
        assert pool["job"] == one_slot_pool and pool["error"] is None
        assert pool["status"]["slots"][0]["model"] == MODEL_A
        assert record.api_key.get_secret_value() not in json.dumps(shown)
        text = mt("pool", "status").stdout
        assert f"pool gemma-pool  {one_slot_pool}  ready" in text
        assert f"{MODEL_A}  ready" in text
        assert f"{MODEL_A} (slot 0, 2 loads), {MODEL_B} (not loaded, 1 loads)" in text

    engine = slot_of(pool_status(record), MODEL_A)
    assert engine is not None
    cancelled = json.loads(mt("cancel", one_slot_pool, "--json").stdout)
    assert cancelled["state"] == "gone"
    assert not is_running(engine["engine_pid"])


def test_concurrent_requests_for_a_cold_model_load_it_once(one_slot_pool: str) -> None:
    record = pool_record(one_slot_pool)
    assert record.base_url is not None and record.pid is not None
    with ThreadPoolExecutor(6) as workers:
        futures = [workers.submit(_direct, one_slot_pool) for _ in range(6)]
        answers = [f.result() for f in futures]
    assert all(model == MODEL_B and text.strip() for model, text in answers), answers
    status = pool_status(record)
    assert loads_of(status, MODEL_B) == 1
    assert status["slots"][0]["loads"] == 1
    assert len(engines_of(record.pid, MODEL_B)) == 1


def _direct(key: str) -> tuple[str, str]:
    """Straight to the pool with its job's key (no gateway): the pool itself collapses loads."""
    client = job_openai(pool_record(key), timeout=180)
    reply = client.chat.completions.create(
        model=MODEL_B, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    return reply.model, reply.choices[0].message.content or ""


def test_pool_refuses_requests_without_its_key(one_slot_pool: str) -> None:
    import openai

    record = pool_record(one_slot_pool)
    wrong = job_openai(record, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL_A, messages=[{"role": "user", "content": "x"}])
    keyed = job_openai(record)
    with pytest.raises(openai.NotFoundError, match="not in this pool's catalogue"):
        keyed.chat.completions.create(model="gemma-c", messages=[{"role": "user", "content": "x"}])
    assert pool_status(record)["slots"][0]["loads"] == 0  # nothing was loaded for either
    # The key is in no process's argv: not the pool's, not an engine's.
    secret = record.api_key.get_secret_value()
    assert record.pid is not None
    pool = psutil.Process(record.pid)
    for proc in [pool, *pool.children(recursive=True)]:
        assert secret not in " ".join(proc.cmdline())
    assert os.stat(Path(os.environ["MT_HOME"]) / "registry").st_mode & 0o077 == 0


@pytest.fixture
def idle_pool(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pool = {"name": "idle-pool", "models": [MODEL_A, MODEL_B], "slots": 2, "idle_unload_s": 3}
    path = pool_models_yaml(tmp_path / "models.yaml", gemma_gguf, pool)
    monkeypatch.setenv("MT_MODELS", str(path))
    record = json.loads(mt("submit", "idle-pool", "--wait", "--json").stdout)
    key: str = record["key"]
    yield key
    mt("cancel", key, check=False)


def test_idle_models_are_unloaded_and_a_dead_engine_is_replaced(idle_pool: str) -> None:
    record = pool_record(idle_pool)
    assert record.base_url is not None
    assert _direct(idle_pool)[0] == MODEL_B
    loaded = slot_of(pool_status(record), MODEL_B)
    assert loaded is not None and is_running(loaded["engine_pid"])
    # Nobody asks for B for idle_unload_s: its slot is emptied and its engine stopped.
    wait_for("B to be unloaded", lambda: slot_of(pool_status(record), MODEL_B) is None, 60)
    assert not is_running(loaded["engine_pid"])
    assert [s["state"] for s in pool_status(record)["slots"]] == ["empty", "empty"]

    # An engine killed under the pool frees its slot; the next request loads the model again.
    assert _direct(idle_pool)[0] == MODEL_B
    again = slot_of(pool_status(record), MODEL_B)
    assert again is not None
    psutil.Process(again["engine_pid"]).kill()
    wait_for(
        "the dead engine's slot to be freed",
        lambda: slot_of(pool_status(record), MODEL_B) is None,
        30,
    )
    assert any("exited" in (s["last_error"] or "") for s in pool_status(record)["slots"])
    assert _direct(idle_pool)[0] == MODEL_B
    assert loads_of(pool_status(record), MODEL_B) == 3


def test_a_stop_lets_the_pools_streams_finish_then_stops_its_engines(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = {"name": "drain-pool", "models": [MODEL_A, MODEL_B], "slots": 1, "drain_s": 60}
    path = pool_models_yaml(tmp_path / "models.yaml", gemma_gguf, pool)
    monkeypatch.setenv("MT_MODELS", str(path))
    key: str = json.loads(mt("submit", "drain-pool", "--wait", "--json").stdout)["key"]
    try:
        record = pool_record(key)
        assert record.base_url is not None and record.pid is not None
        stream = start_stream(
            record.base_url, record.api_key.get_secret_value(), MODEL_A, 100, record.tls_sha256
        )
        assert stream.first_token.wait(120), stream
        engines = engines_of(record.pid, MODEL_A)
        assert engines

        # `mt cancel` TERMs the pool and waits for it: the stream goes on meanwhile.
        cancel = subprocess.Popen(
            [sys.executable, "-m", "hpc.cli", "cancel", key, "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )
        wait_for("draining", lambda: pool_record(key).state == "draining", 5)
        assert not stream.done.is_set(), "the stream ended as the pool began to drain"
        assert stream.done.wait(60), "the stream never finished"
        assert stream.data()[-1] == "[DONE]" and stream.finish_reason() == "length"
        assert all(p.is_running() for p in engines), "an engine stopped before the stream ended"

        out, _ = cancel.communicate(timeout=60)
        assert json.loads(out)["state"] == "gone"
        assert pool_record(key).state == "gone"
        psutil.wait_procs(engines, timeout=10)
        assert not any(p.is_running() for p in engines)
    finally:
        mt("cancel", key, check=False)
