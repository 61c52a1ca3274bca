"""A swap pool as one job on the real private Slurm cluster, with the real Gemma model under
two names (different --ctx-size), the real gateway and the official openai client.

The second test makes a load deterministically slow without timing anything: it stops the
freshly spawned engine of model B with SIGSTOP, shows that a request for the loaded model A
is answered while the pool still reports B ``loading``, then lets B go on with SIGCONT.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from mtcli import mt, running_gateway
from poolhelpers import (
    MODEL_A,
    MODEL_B,
    alternate_and_check,
    ask,
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
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(300)]


def _submit_pool(
    tmp_path: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch, pool: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    path = pool_models_yaml(tmp_path / "models.yaml", gguf, pool)
    monkeypatch.setenv("MT_MODELS", str(path))
    out = mt("submit", pool["name"], "--backend", "slurm", "--wait", "--json", "--timeout", "150")
    record: dict[str, Any] = json.loads(out.stdout)
    assert record["state"] == "ready" and record["engine"] == "pool", record
    assert record["serves"] == [MODEL_A, MODEL_B] and record["job_id"].isdigit()
    yield record
    mt("cancel", record["key"], check=False)


@pytest.fixture
def one_slot(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    pool = {
        "name": "gemma-pool",
        "models": [MODEL_A, MODEL_B],
        "slots": 1,
        "resources": {"cpus": 1, "mem_gb": 2, "time_limit_min": 30},
    }
    yield from _submit_pool(tmp_path, gemma_gguf, monkeypatch, pool)


@pytest.fixture
def two_slots(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    pool = {
        "name": "gemma-duo",
        "models": [MODEL_A, MODEL_B],
        "slots": 2,
        "resources": {"gpus": 2, "cpus": 1, "mem_gb": 2, "time_limit_min": 30},
    }
    yield from _submit_pool(tmp_path, gemma_gguf, monkeypatch, pool)


def test_one_slot_pool_swaps_and_cancels(one_slot: dict[str, Any], cluster: SlurmCluster) -> None:
    squeue = {str(j["job_id"]): j for j in cluster.jobs()}
    assert squeue[one_slot["job_id"]]["job_state"] == "RUNNING"
    assert squeue[one_slot["job_id"]]["name"] == f"mt-gemma-pool-{one_slot['nonce']}"
    record = pool_record(one_slot["key"])
    with running_gateway() as gateway:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, MODEL_A, MODEL_B), 15)
        alternate_and_check(url, record)

    shown = json.loads(mt("pool", "status", "--json").stdout)
    [pool] = shown["pools"]
    assert (pool["pool"], pool["job"], pool["state"]) == ("gemma-pool", one_slot["key"], "ready")
    assert slot_of(pool["status"], MODEL_A) is not None
    text = mt("pool", "status").stdout
    assert f"pool gemma-pool  {one_slot['key']}  ready" in text

    engine = slot_of(pool_status(record), MODEL_A)
    assert engine is not None and is_running(engine["engine_pid"])
    assert json.loads(mt("cancel", one_slot["key"], "--json").stdout)["state"] == "gone"
    assert not is_running(engine["engine_pid"])
    assert cluster.wait_job(int(one_slot["job_id"]), timeout=30) in (None, "CANCELLED", "COMPLETED")


def test_a_held_load_does_not_block_the_loaded_model(two_slots: dict[str, Any]) -> None:
    record = pool_record(two_slots["key"])
    assert record.pid is not None
    with running_gateway() as gateway, ThreadPoolExecutor(4) as workers:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, MODEL_A, MODEL_B), 15)
        assert ask(url, MODEL_A)[0] == MODEL_A

        # Three requests for cold B at once; catch B's engine as it spawns and hold it.
        pending = [workers.submit(ask, url, MODEL_B) for _ in range(3)]
        [engine_b] = wait_for("B's engine", lambda: engines_of(record.pid or 0, MODEL_B), 60)
        engine_b.send_signal(signal.SIGSTOP)
        try:
            loading = slot_of(pool_status(record), MODEL_B)
            assert loading is not None and loading["state"] == "loading", loading

            answered, text = ask(url, MODEL_A, stream=True)  # not blocked by B's load
            assert answered == MODEL_A and text.strip()
            still = slot_of(pool_status(record), MODEL_B)
            assert still is not None and still["state"] == "loading"
            assert not any(f.done() for f in pending)
        finally:
            engine_b.send_signal(signal.SIGCONT)
        answers = [f.result(timeout=180) for f in pending]
        assert all(model == MODEL_B and text.strip() for model, text in answers), answers

    status = pool_status(record)
    assert loads_of(status, MODEL_B) == 1 and loads_of(status, MODEL_A) == 1  # one load each
    slot_a, slot_b = slot_of(status, MODEL_A), slot_of(status, MODEL_B)
    assert slot_a is not None and slot_b is not None
    assert {slot_a["gpus"], slot_b["gpus"]} == {"0", "1"}
    # Each engine sees only its slot's GPU (Slurm granted the job both).
    for slot in (slot_a, slot_b):
        env = psutil.Process(slot["engine_pid"]).environ()
        assert env["CUDA_VISIBLE_DEVICES"] == slot["gpus"]
        assert env["SLURM_JOB_GPUS"] == "0,1"
