"""Parity: one spec through local, Slurm and Kubernetes gives records of the same shape,
and the gateway routes to the Kubernetes one once its Deployment is Available.

Driven through the real `mt` CLI (subprocesses); the Kubernetes API is the fake server,
reached through a generated kubeconfig, and Slurm the private cluster (skips without it).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes", reason="pip install -e '.[kubernetes]'")

from fake_k8s_api import FakeKubeAPI
from mtcli import mt, running_gateway

pytestmark = pytest.mark.timeout(180)

NS = "parity"
MODEL = "parity-model"


@pytest.fixture
def k8s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
        yield api


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Weights that are not there: the local and Slurm jobs fail fast, which is enough to
    # compare the records their backends write.
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {MODEL}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(tmp_path / 'missing.gguf'))}, quant: Q4_K_M}}\n"
        "    startup_timeout_s: 60\n"
        "    resources: {cpus: 1, mem_gb: 1, time_limit_min: 5}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_MODELS", str(path))
    return path


def status() -> dict[str, dict[str, Any]]:
    return {r["backend"]: r for r in json.loads(mt("status", "--all", "--json").stdout)}


def submit(backend: str) -> str:
    done = mt("submit", MODEL, "--backend", backend, "--json")
    return str(json.loads(done.stdout)["job_id"])


def test_local_and_kubernetes_records_match_and_gateway_routes(
    k8s: FakeKubeAPI, models: Path
) -> None:
    local_id = submit("local")
    k8s_id = submit("kubernetes")
    k8s.set_available(k8s_id, NS)
    records = status()  # asks each backend: the Kubernetes record becomes ready here
    assert set(records) == {"local", "kubernetes"}
    assert records["kubernetes"].keys() == records["local"].keys()
    ready = records["kubernetes"]
    assert ready["state"] == "ready"
    assert ready["node"] == f"{k8s_id}.{NS}.svc"
    assert ready["base_url"] == f"http://{k8s_id}.{NS}.svc:8000/v1"
    assert ready["model"] == records["local"]["model"] == MODEL
    assert ready["engine"] == records["local"]["engine"] == "llamacpp"

    with running_gateway() as url:
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp:  # noqa: S310
                ids = [m["id"] for m in json.load(resp)["data"]]
            if MODEL in ids:
                break
            assert time.monotonic() < deadline, f"the gateway never listed {MODEL}: {ids}"
            time.sleep(0.2)

    mt("cancel", f"kubernetes-{k8s_id}")
    mt("cancel", f"local-{local_id}")
    after = status()
    assert after["kubernetes"]["state"] == "gone"
    assert k8s.names("deployments", NS) == []


@pytest.mark.slurm
def test_slurm_record_has_the_same_fields(k8s: FakeKubeAPI, models: Path, cluster: Any) -> None:
    del cluster  # SLURM_CONF is set for the subprocesses
    slurm_id = submit("slurm")
    submit("kubernetes")
    records = status()
    assert records["slurm"].keys() == records["kubernetes"].keys()
    assert records["slurm"]["model"] == records["kubernetes"]["model"] == MODEL
    mt("cancel", f"slurm-{slurm_id}")
