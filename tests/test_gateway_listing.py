"""``GET /v1/models`` for UIs: ready models, on-demand models at zero and swap-pool
catalogues, each with its ``mt`` state, filtered by the key's allow-list; `mt models` shows
the same rows (``hpc.catalog.listing``).

The gateway runs on real ports with the on-demand tests' ``FakeScheduler`` (a backend) and a
``FakeUpstream`` engine; records are written with the real ``Registry``.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fake_upstream import FakeUpstream
from pydantic import SecretStr
from test_cli import run
from test_gateway_limits import bearer
from test_gateway_ondemand import FakeScheduler, ask, gateway, until

from gateway.keys import create_key
from hpc.catalog import catalog, listing
from hpc.ondemandstate import (
    ModelEntry,
    OnDemandState,
    default_path,
    read_ondemand_state,
)
from hpc.privatefile import write_private
from hpc.registry import Record, Registry, State, new_nonce
from hpc.spec import ModelsFile

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(60)

MODELS: dict[str, Any] = {
    "models": [
        {"name": "ready", "engine": "vllm", "weights": {"source": "o/r"}, "aliases": ["fast"]},
        {"name": "od", "engine": "llamacpp", "weights": {"source": "/x.gguf"}, "on_demand": {}},
        {"name": "od-up", "engine": "llamacpp", "weights": {"source": "/x.gguf"}, "on_demand": {}},
        {"name": "booting", "engine": "vllm", "weights": {"source": "o/b"}},
        {"name": "off", "engine": "vllm", "weights": {"source": "o/o"}},
        {"name": "p1", "engine": "vllm", "weights": {"source": "o/p1"}},
        {"name": "p2", "engine": "vllm", "weights": {"source": "o/p2"}},
    ],
    "pools": [{"name": "pool", "models": ["p1", "p2"]}],
    "static": [{"name": "shared", "base_url": "http://10.0.0.5:8000/v1"}],
}


def record(
    model: str, state: State, base_url: str | None = None, backend: str = "local", **more: Any
) -> Record:
    return Record(
        backend=backend,
        job_id=new_nonce(),
        nonce=new_nonce(),
        model=model,
        engine="llamacpp",
        state=state,
        base_url=base_url,
        api_key=SecretStr("mtj-key"),
        created_at=1000.0,
        **more,
    )


def records() -> list[Record]:
    return [
        record("ready", "ready", "http://n1:1/v1"),
        record("od-up", "pending"),
        record("booting", "starting"),
        record("pool", "ready", "http://n2:2/v1", serves=("p1", "p2")),
    ]


def test_every_name_has_a_state_and_only_usable_ones_are_listed() -> None:
    served = catalog(ModelsFile.model_validate(MODELS), records())
    rows = {row.model.name: row for row in listing(served, {"od": 42.5})}
    states = {name: (row.state, row.starts_on_request) for name, row in rows.items()}
    assert states == {
        "ready": ("ready", False),
        "od": ("on_demand", True),
        "od-up": ("starting", True),
        "booting": ("starting", False),  # a request gets 503 until it is ready
        "off": ("stopped", False),
        "p1": ("pool", True),
        "p2": ("pool", True),
        "shared": ("ready", False),
        "fast": ("ready", False),  # the alias, as its model
    }
    assert sorted(n for n, row in rows.items() if row.usable) == [
        "fast",
        "od",
        "od-up",
        "p1",
        "p2",
        "ready",
        "shared",
    ]
    assert rows["od"].last_start_s == 42.5
    assert rows["ready"].created == rows["fast"].created == 1000
    assert rows["od"].openai() == {
        "id": "od",
        "object": "model",
        "created": 0,
        "owned_by": "modeltainer",
        "mt": {"state": "on_demand", "starts_on_request": True, "last_start_s": 42.5},
    }
    # A gateway without a backend starts nothing: an on-demand model at zero is stopped.
    no_backend = {row.model.name: row for row in listing(served, starts_jobs=False)}
    assert (no_backend["od"].state, no_backend["od"].usable) == ("stopped", False)


def models_yaml(path: Path) -> Path:
    path.write_text(json.dumps(MODELS), encoding="utf-8")
    return path


async def listed(url: str, key: str | None = None) -> dict[str, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(url + "/v1/models", headers=bearer(key) if key else None) as resp,
    ):
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    return {model["id"]: model for model in body["data"]}


async def test_the_list_follows_the_key_and_an_on_demand_start(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path / "registry")
    backend = FakeScheduler(registry)
    keys = tmp_path / "keys.yaml"
    alice = create_key(keys, "alice", models=("od*", "p1"))
    bob = create_key(keys, "bob")
    async with (
        FakeUpstream() as engine,
        gateway(
            tmp_path, backend, models_file=models_yaml(tmp_path / "models.yaml"), keys_file=keys
        ) as (url, controller),
    ):
        # Not the FakeScheduler's backend: its records() are the on-demand jobs.
        pool = record("pool", "ready", engine.base_url, backend="slurm", serves=("p1", "p2"))
        registry.write(pool)
        everything = await listed(url, bob)
        for _ in range(100):  # the reload loop picks the pool's record up
            if "p1" in everything:
                break
            await asyncio.sleep(0.05)
            everything = await listed(url, bob)
        assert sorted(everything) == ["od", "od-up", "p1", "p2", "shared"]
        assert everything["od"]["mt"] == {
            "state": "on_demand",
            "starts_on_request": True,
            "last_start_s": None,
        }
        assert everything["p1"]["mt"]["state"] == "pool"
        assert sorted(await listed(url, alice)) == ["od", "od-up", "p1"]

        # The openai client reads the list, the extension field included.
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=alice, max_retries=0)
        async with client:
            page = await client.models.list()
        extension = {m.id: (m.model_extra or {})["mt"]["state"] for m in page.data}
        assert extension == {"od": "on_demand", "od-up": "on_demand", "p1": "pool"}

        # A request starts od; once it is ready the list says so, and how long it took.
        async with aiohttp.ClientSession() as http:
            call = asyncio.create_task(ask(http, url, "od", False, **bearer(alice)))
            await until(backend.records)
            starting = await listed(url, alice)
            assert starting["od"]["mt"]["state"] in ("on_demand", "starting")
            [pending] = backend.records()
            backend.run(pending, engine.base_url)
            status, text, _ = await call
        assert status == 200, text
        await until(lambda: controller.states["od"].last_start_s is not None)
        for _ in range(100):
            now = (await listed(url, alice))["od"]["mt"]
            if now["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert now["state"] == "ready"
        assert now["starts_on_request"] is False
        assert now["last_start_s"] == controller.states["od"].last_start_s
        await until(lambda: "od" in read_ondemand_state(controller.state_file))
        await until(
            lambda: read_ondemand_state(controller.state_file)["od"].last_start_s is not None
        )


def test_mt_models_shows_the_same_states(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped
    models = models_yaml(tmp_path / "models.yaml")
    home = Path(os.environ["MT_HOME"])
    registry = Registry(home / "registry")
    for written in records():
        registry.write(written)
    # What a gateway published of od's last start (hpc.ondemandstate, beside the registry).
    state = OnDemandState(
        updated_at=1.0,
        gateway_pid=1,
        backend="local",
        models={"od": ModelEntry(state="idle", last_start_s=42.0)},
    )
    write_private(default_path(registry.path), state.model_dump_json().encode())
    code, out, _ = run(capsys, "--models", str(models), "models", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    served = catalog(ModelsFile.model_validate(MODELS), registry.records())
    expected = listing(served, {"od": 42.0})
    assert {name: row["state"] for name, row in rows.items()} == {
        row.model.name: row.state for row in expected
    }
    assert rows["od"]["starts_on_request"] is True
    assert rows["od"]["last_start_s"] == 42.0
    assert rows["p1"]["endpoints"] == ["http://n2:2/v1"]
    code, out, _ = run(capsys, "--models", str(models), "models")
    assert code == 0
    assert "on_demand (last start 42 s)" in out
    assert "none (starts on request)" in out


async def test_a_restarted_gateway_still_knows_the_last_start(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.ensure()
    backend = FakeScheduler(registry)
    previous = OnDemandState(
        updated_at=1.0,
        gateway_pid=1,
        backend="local",
        models={"od": ModelEntry(state="idle", last_start_s=42.0)},
    )
    write_private(default_path(registry.path), previous.model_dump_json().encode())
    models = models_yaml(tmp_path / "models.yaml")
    async with gateway(tmp_path, backend, models_file=models) as (url, _controller):
        shown = await listed(url)
    assert shown["od"]["mt"] == {
        "state": "on_demand",
        "starts_on_request": True,
        "last_start_s": 42.0,
    }
    assert shown["od-up"]["mt"]["last_start_s"] is None
