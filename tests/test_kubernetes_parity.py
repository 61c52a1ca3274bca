"""Parity: one spec through local, Slurm and Kubernetes gives records of the same shape,
all three ready, and the gateway lists all three (and routes to the local and Slurm ones).

Driven through the real `mt` CLI (subprocesses). Local and Slurm run the real llama.cpp
engine with the Gemma GGUF (Slurm on the private cluster); the Kubernetes API is the fake
server, reached through a generated kubeconfig, whose Deployment is flipped to Available.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip("kubernetes", reason="pip install -e '.[kubernetes]'")

from fake_k8s_api import FakeKubeAPI
from mtcli import engine_processes, mt, owner_headers, running_gateway
from slurmcluster import SlurmCluster

from hpc.registry import Registry

pytestmark = [pytest.mark.llamacpp, pytest.mark.slurm, pytest.mark.timeout(300)]

NS = "parity"
# The same spec shape under three names, one per backend.
NAMES = {"local": "gemma-local", "slurm": "gemma-slurm", "kubernetes": "gemma-k8s"}


@pytest.fixture
def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
        mt("keys", "create", "ops")  # the client keys of the gateway that submit applies
        yield api


@pytest.fixture
def models(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models.yaml: the real Gemma GGUF three times, identical but for the name (JSON is YAML)."""
    lines = ["models:"]
    for name in NAMES.values():
        spec = {
            "name": name,
            "engine": "llamacpp",
            "weights": {"source": str(gemma_gguf)},
            "engine_args": ["--ctx-size", "1024"],
            "startup_timeout_s": 120,
            "resources": {"cpus": 1, "mem_gb": 1, "time_limit_min": 30},
        }
        lines.append(f"  - {json.dumps(spec)}")
    path = tmp_path / "models.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


def status() -> dict[str, dict[str, Any]]:
    return {r["backend"]: r for r in json.loads(mt("status", "--all", "--json").stdout)}


def submit(backend: str, *extra: str) -> dict[str, Any]:
    done = mt("submit", NAMES[backend], "--backend", backend, "--json", *extra)
    record: dict[str, Any] = json.loads(done.stdout)
    # Without --wait the JSON has no "key" yet; it is always "<backend>-<job_id>".
    assert record.setdefault("key", f"{backend}-{record['job_id']}") == (
        f"{backend}-{record['job_id']}"
    )
    return record


def gateway_models(url: str) -> list[str]:
    request = urllib.request.Request(f"{url}/v1/models", headers=owner_headers())  # noqa: S310
    with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310
        return [m["id"] for m in json.load(resp)["data"]]


def chat(url: str, model: str) -> str:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(  # noqa: S310
        f"{url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json", **owner_headers()},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:  # noqa: S310
        reply = json.load(resp)
    assert reply["model"] == model, reply
    return str(reply["choices"][0]["message"]["content"])


def engine_pid(key: str) -> int:
    stored = Registry(Path(os.environ["MT_HOME"]) / "registry").find(key)
    assert stored is not None and stored.engine_pid is not None, stored
    return stored.engine_pid


def test_same_spec_on_local_slurm_and_kubernetes(
    k8s: FakeKubeAPI, models: Path, cluster: SlurmCluster
) -> None:
    submitted: dict[str, dict[str, Any]] = {}
    try:
        submitted["local"] = submit("local", "--wait", "--timeout", "150")
        submitted["slurm"] = submit("slurm", "--wait", "--timeout", "150")
        submitted["kubernetes"] = submit("kubernetes")
        assert submitted["local"]["state"] == "ready", submitted["local"]
        assert submitted["slurm"]["state"] == "ready", submitted["slurm"]
        k8s_id = submitted["kubernetes"]["job_id"]
        k8s.set_available(k8s_id, NS)

        records = status()  # asks each backend: the Kubernetes record becomes ready here
        assert set(records) == set(NAMES)
        fields = records["local"].keys()
        assert records["slurm"].keys() == fields
        assert records["kubernetes"].keys() == fields
        for backend, record in records.items():
            assert record["state"] == "ready", record
            assert record["model"] == NAMES[backend]
            assert record["engine"] == "llamacpp"
            assert record["key"] == submitted[backend]["key"]
        assert records["local"]["base_url"].startswith("https://127.0.0.1:")  # the job's front
        assert records["slurm"]["node"] in ("gpu1", "gpu2")
        ready = records["kubernetes"]
        assert ready["node"] == f"{k8s_id}.{NS}.svc"
        assert ready["base_url"] == f"http://{k8s_id}.{NS}.svc:8000/v1"

        with running_gateway() as url:
            deadline = time.monotonic() + 10
            while not set(NAMES.values()) <= set(ids := gateway_models(url)):
                assert time.monotonic() < deadline, f"the gateway never listed all three: {ids}"
                time.sleep(0.2)
            # The Kubernetes one points at a Service DNS name that does not resolve here.
            for backend in ("local", "slurm"):
                assert chat(url, NAMES[backend]).strip(), backend

        engines = {b: psutil.Process(engine_pid(submitted[b]["key"])) for b in ("local", "slurm")}
        for backend in ("kubernetes", "slurm", "local"):
            cancelled = json.loads(mt("cancel", submitted.pop(backend)["key"], "--json").stdout)
            assert cancelled["state"] == "gone", cancelled
        after = status()
        assert {b: r["state"] for b, r in after.items()} == dict.fromkeys(NAMES, "gone")
        assert k8s.names("deployments", NS) == ["mt-gateway"]  # the job's is gone, not the gateway
        assert engine_processes(records["local"]["engine_pid"]) == []
        for engine in engines.values():
            assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    finally:
        for record in submitted.values():  # a failure above: leave no engine behind
            mt("cancel", record["key"], check=False)
