"""Swap pools without engines: the pools: section, the pool's sbatch script, GPU split,
routing of a pool's names, and how `mt pool status` reads on-demand bookkeeping."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from gateway.routes import build_routes
from hpc.configfile import load_models
from hpc.errors import ConfigError, EngineError
from hpc.job.plan import PoolPlan, warning_drain_s
from hpc.job.slots import split_gpus
from hpc.ondemandstate import STATE_FILE, JobEntry, ModelEntry, OnDemandState
from hpc.poolstatus import on_demand_views, read_ondemand_state, status_url
from hpc.registry import Record, State, new_nonce
from hpc.site import SlurmSite
from hpc.slurm.sbatch import render
from hpc.spec import ModelsFile, PoolSpec

GOLDEN = Path(__file__).parent / "golden" / "sbatch"
UPDATE = os.environ.get("MT_UPDATE_GOLDEN") == "1"  # read before the env is cleaned

MODELS = """\
models:
  - name: qwen-coder
    engine: vllm
    weights: {source: Qwen/Qwen2.5-Coder-7B-Instruct}
  - name: llama-8b
    engine: vllm
    weights: {source: meta-llama/Llama-3.1-8B-Instruct}
  - name: gemma-gguf
    engine: llamacpp
    weights: {source: /models/gemma.gguf}
pools:
  - name: small-models
    models: [qwen-coder, llama-8b, gemma-gguf]
    slots: 2
    resources: {gpus: 4, cpus: 16, mem_gb: 64, time_limit_min: 1440}
    slurm: {partition: gpu, qos: long}
    idle_unload_s: 600
"""


def _load(tmp_path: Path, text: str) -> ModelsFile:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return load_models(path)


def _errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    return [str(issue) for issue in caught.value.issues]


def test_a_pool_loads_with_mixed_engines(tmp_path: Path) -> None:
    models = _load(tmp_path, MODELS)
    pool = models.pool("small-models")
    assert pool is not None and pool.slots == 2 and pool.idle_unload_s == 600
    assert [s.name for s in models.catalogue(pool)] == ["qwen-coder", "llama-8b", "gemma-gguf"]
    assert models.pool("qwen-coder") is None and models.get("small-models") is None


def test_an_unknown_catalogue_name_names_the_entry_and_its_line(tmp_path: Path) -> None:
    text = MODELS.replace("[qwen-coder, llama-8b, gemma-gguf]", "[qwen-coder, mistral-7b]")
    assert _errors(tmp_path, text) == [
        "models.yaml:13: pools[0].models[1]: pool 'small-models' lists 'mistral-7b', which is "
        "not a model in this file (models: qwen-coder, llama-8b, gemma-gguf)"
    ]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ("slots: 2", "pools[0]", "cannot be split evenly between slots=3"),
        ("idle_unload_s: 600", "pools[0].idle_unload_s", "greater than 0"),
        ("[qwen-coder, llama-8b, gemma-gguf]", "pools[0]", "listed twice"),
        ("slots: 2", "pools[0].slurm", "unknown field"),
    ],
)
def test_bad_pool_fields(tmp_path: Path, change: str, field: str, message: str) -> None:
    replacement = {
        "slots: 2": "slots: 3",
        "idle_unload_s: 600": "idle_unload_s: 0",
        "[qwen-coder, llama-8b, gemma-gguf]": "[qwen-coder, qwen-coder]",
    }[change]
    text = MODELS.replace(change, replacement)
    if field.endswith("slurm"):
        text = MODELS.replace("qos: long}", "qos: long, partitoin: x}")
    [error] = _errors(tmp_path, text)
    assert f": {field}" in error and message in error, error


def test_a_pool_and_a_model_cannot_share_a_name(tmp_path: Path) -> None:
    text = MODELS.replace("  - name: small-models", "  - name: llama-8b")
    [error] = _errors(tmp_path, text)
    assert "pools[0].name: duplicate model name 'llama-8b' (first in models[1])" in error


def _plan(tmp_path: Path) -> tuple[PoolSpec, PoolPlan]:
    models = _load(tmp_path, MODELS)
    pool = models.pool("small-models")
    assert pool is not None
    plan = PoolPlan(
        pool=pool,
        catalogue=models.catalogue(pool),
        backend="slurm",
        nonce="0123abcd",
        registry_dir=Path("/home/ada/.mt/registry"),
        engine_host="0.0.0.0",
        warning_drain_s=warning_drain_s(pool.slurm.signal_grace_s),  # as the backend sets it
    )
    return pool, plan


def test_pool_sbatch_golden(tmp_path: Path) -> None:
    pool, plan = _plan(tmp_path)
    site = SlurmSite(account="default-acct", modules=("cuda/12.4",))
    script, job = render(
        pool, plan, site, log_dir=Path("/home/ada/.mt/logs"), python="/opt/mt/venv/bin/python"
    )
    assert job.name == "mt-small-models-0123abcd"
    assert "#SBATCH --gres=gpu:4" in script and "#SBATCH --qos=long" in script
    assert "exec /opt/mt/venv/bin/python -m hpc.job.swappool --plan - <<'MT_PLAN'" in script
    assert "mtj-" not in script  # no key
    path = GOLDEN / "pool_two_slots.sbatch"
    if UPDATE:
        path.write_text(script, encoding="utf-8")
    assert script == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"
    embedded = script.split("<<'MT_PLAN'\n", 1)[1].split("\nMT_PLAN", 1)[0]
    assert PoolPlan.model_validate_json(embedded) == plan


def test_gpus_split_evenly_between_slots() -> None:
    assert split_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 2) == [("0", "1"), ("2", "3")]
    assert split_gpus({"CUDA_VISIBLE_DEVICES": "4,6"}, 2) == [("4",), ("6",)]
    assert split_gpus({"ROCR_VISIBLE_DEVICES": "0,1"}, 1) == [("0", "1")]
    assert split_gpus({}, 3) == [(), (), ()]  # a CPU pool
    with pytest.raises(EngineError, match="cannot be split evenly between 2 slots"):
        split_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 2)


def _record(model: str, state: State, serves: tuple[str, ...] = (), **extra: Any) -> Record:
    return Record(
        backend="slurm",
        job_id=new_nonce(),
        nonce=new_nonce(),
        model=model,
        engine="pool" if serves else "llamacpp",
        state=state,
        base_url="http://gpu1:4242/v1",
        api_key=SecretStr("mtj-pool"),
        serves=serves,
        **extra,
    )


def test_a_ready_pool_routes_every_name_it_serves() -> None:
    table = build_routes([_record("pool", "ready", ("a", "b"))], None, {})
    assert table.names() == ["a", "b"]
    for name in ("a", "b"):
        [upstream] = table.pick(name)
        assert upstream.model == name and upstream.api_key == "mtj-pool"
        assert upstream.url("/chat/completions") == "http://gpu1:4242/v1/chat/completions"
    assert not table.is_known("pool")  # the pool's own name is no model


def test_a_starting_pool_makes_its_names_known_not_routable() -> None:
    table = build_routes([_record("pool", "starting", ("a", "b"))], None, {})
    assert table.names() == []
    assert table.is_starting("a") and table.is_starting("b") and not table.is_known("c")


def test_status_url_of_a_pool() -> None:
    assert status_url(_record("pool", "ready", ("a",))) == "http://gpu1:4242/pool/status"


def test_ondemand_state_is_optional_and_read_leniently(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    assert read_ondemand_state(path) == {}
    path.write_text("{not json", encoding="utf-8")
    assert read_ondemand_state(path) == {}
    # Not the gateway's shape (another program's file): ignored whole, not picked over.
    path.write_text(json.dumps({"models": {"m": {"state": "ready"}, "bad": 3}}), "utf-8")
    assert read_ondemand_state(path) == {}
    written = {"updated_at": 1.0, "gateway_pid": 1, "backend": None, "models": {}}
    written["models"] = {"m": {"state": "ready"}}
    path.write_text(json.dumps(written), "utf-8")
    assert read_ondemand_state(path) == {"m": ModelEntry(state="ready")}


def test_ondemand_state_file_round_trips_the_gateways_json(tmp_path: Path) -> None:
    # The JSON a running gateway writes today reads back, and is written the same again.
    document = {
        "version": 1,
        "updated_at": 1000.5,
        "gateway_pid": 42,
        "backend": "slurm",
        "models": {
            "m": {
                "state": "ready",
                "idle_ttl_s": 300,
                "last_request_at": 990.0,
                "idle_for_s": 10.5,
                "in_flight": 0,
                "error": None,
                "failed_at": None,
                "last_start_s": 95.0,
                "jobs": [
                    {
                        "job": "slurm-1",
                        "state": "ready",
                        "started_at": 900.0,
                        "why": "gateway on demand: request r1 for m (key -)",
                        "in_flight": 0,
                        "node": "gpu1",
                    }
                ],
            }
        },
    }
    state = OnDemandState.model_validate_json(json.dumps(document))
    assert state.model_dump(mode="json") == document
    assert json.dumps(state.model_dump(mode="json")) == json.dumps(document)


def test_on_demand_jobs_join_the_gateways_bookkeeping() -> None:
    started = _record("m", "ready", started_by="gateway: on demand, request from alice")
    plain = _record("other", "ready")
    # The shape gateway/ondemand/statefile.py writes (the "models" part of the file).
    raw = {
        "m": {
            "state": "ready",
            "last_request_at": 1000.0,
            "idle_ttl_s": 300,
            "jobs": [{"job": started.key, "state": "ready", "started_at": 900.0, "why": "x"}],
        },
        "cold": {
            "state": "pending",
            "jobs": [{"job": "slurm-77", "state": "pending", "started_at": 990.0, "why": "req"}],
        },
        "old": {"state": "idle", "jobs": []},
        "new": {"state": "submitting", "jobs": []},
    }
    state = {name: ModelEntry.model_validate(entry) for name, entry in raw.items()}
    views = on_demand_views([started, plain], state)
    assert [(v.model, v.job, v.state) for v in views] == [
        ("m", started.key, "ready"),
        ("cold", "slurm-77", "pending"),
        ("new", None, "submitting"),
    ]
    assert views[0].why == "gateway: on demand, request from alice"
    assert views[0].started_at == 900.0 and views[1].why == "req"
    assert views[0].idle_s(1042.0) == 42.0 and views[0].idle_ttl_s == 300
    assert views[1].public(1000.0)["idle_s"] is None


def test_bookkeeping_of_another_job_of_the_model_is_not_mixed_in() -> None:
    started = _record("m", "ready", started_by="gateway")
    other = JobEntry(job="slurm-1", state="ready")
    entry = ModelEntry(state="ready", idle_ttl_s=5, jobs=[other])
    views = on_demand_views([started], {"m": entry})
    assert [(v.job, v.idle_ttl_s) for v in views] == [(started.key, None), ("slurm-1", 5)]


def test_pool_spec_rejects_an_empty_catalogue() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        PoolSpec.model_validate({"name": "p", "models": []})


def test_mt_models_lists_a_ready_pool_under_every_name_it_serves() -> None:
    from hpc.catalog import served_models

    rows = served_models(None, [_record("pool", "ready", ("a", "b"))])
    assert [(r.name, r.source, [e.base_url for e in r.endpoints]) for r in rows] == [
        ("a", "job", ["http://gpu1:4242/v1"]),
        ("b", "job", ["http://gpu1:4242/v1"]),
    ]
