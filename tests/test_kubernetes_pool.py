"""Swap pools on Kubernetes: seed 002's layout (two pinned models and a pool) from one
models.yaml (its golden tree, schemas, ``kubectl kustomize`` and ``mt render``:
tests/test_kubernetes_seeds.py, with the other seeds'); the pool's
Deployment through the fake API server (submit, ready, cancel; ``--dry-run``); and the
rendered pool pod and gateway pod run here with a real llama-server, so what the manifests
say (plan, key, port, probes' path) is what the pool process does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from mtcli import llama_server_binary
from test_gateway_proxy import CHAT, chat
from test_kubernetes_layout import _mapped, _pod_gateway, _resolve_env
from test_kubernetes_manifests import (
    CLIENT_KEYS,
    KEY,
    METRICS_TOKEN,
)
from test_kubernetes_seeds import seed_tree as seeds_tree

from hpc.configfile import load_models
from hpc.errors import MTError
from hpc.job.plan import PoolPlan
from hpc.k8s.kustomize import layout_tree
from hpc.k8s.pool import KEY_ENV, MIN_GRACE_S
from hpc.site import SiteConfig
from hpc.spec import ModelsFile, PoolSpec

pytestmark = pytest.mark.timeout(120)

SEED = Path(__file__).resolve().parent.parent / "docs" / "examples" / "seed-002"
PINNED = ("qwen3-coder-30b", "gpt-oss-20b")
POOL = "swap"
# Read at import, before tests/conftest.py's autouse fixture clears MT_*.
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")


def seed() -> tuple[ModelsFile, SiteConfig]:
    """Seed 002's models.yaml and site.yaml, as `mt` reads them."""
    models = load_models(SEED / "models.yaml")
    site = SiteConfig.model_validate(yaml.safe_load((SEED / "site.yaml").read_text("utf-8")))
    return models, site


def seed_tree() -> dict[str, str]:
    """The tree `mt render --backend kubernetes qwen3-coder-30b gpt-oss-20b swap` writes
    (its golden tree, schemas, kubectl kustomize and mt render: tests/test_kubernetes_seeds.py)."""
    return seeds_tree("seed-002")


def parsed(files: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of a tree (no Kustomizations)."""
    docs = [d for rel, t in files.items() if rel.endswith(".yaml") for d in yaml.safe_load_all(t)]
    return [d for d in docs if d["kind"] != "Kustomization"]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_each_deployment_is_pinned_to_its_role_with_one_amd_gpu() -> None:
    objects = parsed(seed_tree())
    roles = {"mt-qwen3-coder-30b": "static-a", "mt-gpt-oss-20b": "static-b", "mt-swap": "swap"}
    for name, role in roles.items():
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        expr = {"key": "ai.llm.role", "operator": "In", "values": [role]}
        assert terms["nodeSelectorTerms"] == [{"matchExpressions": [expr]}], name
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["amd.com/gpu"] == "1", name
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert pod["terminationGracePeriodSeconds"] >= 60, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, name
        claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
        assert one(objects, "PersistentVolumeClaim", claim["persistentVolumeClaim"]["claimName"])


def test_the_pool_pod_runs_the_pool_process_with_its_catalogue() -> None:
    """One container runs `python -m hpc.job.swappool` on the plan in its ConfigMap; an init
    container per catalogue model fetches its weights where the plan says they are."""
    objects = parsed(seed_tree())
    models, _ = seed()
    pool = models.pool(POOL)
    assert pool is not None
    dep = one(objects, "Deployment", "mt-swap")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "hpc.job.swappool"]
    assert container["image"] == pool.kubernetes.image
    key_ref = {"secretKeyRef": {"name": "mt-swap-key", "key": "api-key"}}
    assert {"name": KEY_ENV, "valueFrom": key_ref} in container["env"]
    assert {"name": "ROCR_VISIBLE_DEVICES", "value": "0"} in container["env"]
    assert KEY not in json.dumps(dep)  # the key is in the Secret only
    assert one(objects, "Secret", "mt-swap-key")["stringData"] == {"api-key": KEY}

    config = one(objects, "ConfigMap", "mt-swap-config")["data"]
    assert KEY not in json.dumps(config)
    plan = PoolPlan.model_validate_json(config["plan.json"])  # what the pool reads
    assert plan.cluster is not None and plan.registry_dir is None
    assert (plan.cluster.port, plan.cluster.key_env) == (8000, KEY_ENV)
    assert plan.pool.models == pool.models
    assert [s.name for s in plan.catalogue] == list(pool.models)
    fetched = {}
    for init in pod["initContainers"]:
        env = {e["name"]: e.get("value") for e in init["env"]}
        fetched[env["MT_MODEL"]] = env["MT_WEIGHTS_DIR"]
    for spec in plan.catalogue:
        assert spec.runtime.kind == "none"  # the pod's image is the runtime
        assert spec.weights.source == f"{fetched[spec.name]}/model.gguf"
    assert pod["terminationGracePeriodSeconds"] >= max(
        MIN_GRACE_S, plan.drain_s + plan.stop_grace_s
    )
    # The startup budget covers the slowest model of the catalogue.
    startup = container["startupProbe"]
    slowest = max(s.startup_timeout_s for s in models.catalogue(pool))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= slowest


def test_the_gateway_routes_every_catalogue_name_to_the_pool() -> None:
    objects = parsed(seed_tree())
    models, _ = seed()
    config = one(objects, "ConfigMap", "mt-gateway-models")["data"]["models.yaml"]
    routed = ModelsFile.model_validate(yaml.safe_load(config))  # the gateway's own loader's model
    backends = {s.name: (s.base_url, s.api_key_env) for s in routed.static}
    pool_url = "http://mt-swap.llm.svc:8000/v1"
    pool = models.pool(POOL)
    assert pool is not None
    for name in pool.models:
        assert backends[name] == (pool_url, "MT_ENGINE_KEY_SWAP"), name
    assert backends["qwen3-coder-30b"][0] == "http://mt-qwen3-coder-30b.llm.svc:8000/v1"
    assert POOL not in backends  # the pool is no model: clients ask for its models
    gateway = one(objects, "Deployment", "mt-gateway")["spec"]["template"]["spec"]
    env = gateway["containers"][0]["env"]
    key_ref = {"secretKeyRef": {"name": "mt-swap-key", "key": "api-key"}}
    assert {"name": "MT_ENGINE_KEY_SWAP", "valueFrom": key_ref} in env


def test_only_the_gateway_and_prometheus_reach_the_pool() -> None:
    objects = parsed(seed_tree())
    policy = one(objects, "NetworkPolicy", "mt-swap")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "mt-swap"
    peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "mt-gateway"
    assert peers[1] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    rules = one(objects, "PrometheusRule", "mt-alerts")["spec"]["groups"][1]["rules"]
    assert any('deployment="mt-swap"' in r["expr"] for r in rules)  # no ready replica alert
    # Prometheus scrapes the pool's own /metrics with the pool's key, as an engine's.
    monitor = one(objects, "ServiceMonitor", "mt-swap")["spec"]
    assert monitor["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "mt-swap"
    (endpoint,) = monitor["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {"name": "mt-swap-key", "key": "api-key"}


def test_a_pool_without_an_image_is_refused_with_a_hint() -> None:
    models, site = seed()
    pool = models.pool(POOL)
    assert pool is not None
    bare = PoolSpec.model_validate(
        pool.model_dump(exclude={"kubernetes": {"image"}}, exclude_defaults=True)
    )
    with pytest.raises(MTError, match="names none") as caught:
        layout_tree(
            [],
            api_keys={POOL: KEY},
            client_keys=CLIENT_KEYS,
            metrics_token=METRICS_TOKEN,
            site=site.kubernetes,
            pools=[(bare, models.catalogue(pool))],
        )
    assert caught.value.hint is not None and "kubernetes.image" in caught.value.hint


# --- the rendered pods, run here -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def llama_server_first(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The built llama-server, first on the PATH (the pool's image has it on its PATH)."""
    binary = llama_server_binary(LLAMA_SERVER)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    return binary


def _tiny_layout() -> dict[str, str]:
    """A pool of the real Gemma under two names (as seed 002's, on a CPU node)."""
    entry = {"engine": "llamacpp", "weights": {"source": "ggml-org/gemma-3-270m-GGUF"}}
    models = ModelsFile.model_validate(
        {
            "models": [
                {**entry, "name": "gemma-a", "engine_args": ["--ctx-size", "1024"]},
                {**entry, "name": "gemma-b", "engine_args": ["--ctx-size", "512"]},
            ],
            "pools": [
                {
                    "name": "cpu-pool",
                    "models": ["gemma-a", "gemma-b"],
                    "kubernetes": {"namespace": "llm", "role": "swap", "image": "mt-pool:test"},
                }
            ],
        }
    )
    pool = models.pool("cpu-pool")
    assert pool is not None
    _, site = seed()
    return layout_tree(
        [],
        api_keys={"cpu-pool": KEY},
        client_keys=CLIENT_KEYS,
        metrics_token=METRICS_TOKEN,
        site=site.kubernetes,
        pools=[(pool, models.catalogue(pool))],
    )


@pytest.fixture
def tiny_objects() -> list[dict[str, Any]]:
    """The objects of :func:`_tiny_layout`."""
    return parsed(_tiny_layout())


@pytest.fixture
def pool_pod(
    tmp_path: Path,
    gemma_gguf: Path,
    llama_server_first: Path,
    tiny_objects: list[dict[str, Any]],
) -> Iterator[str]:
    """The rendered pool container's command, env, Secret and ConfigMap, run here: its
    volume holds what the init containers would have fetched (the real Gemma GGUF)."""
    objects = tiny_objects
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects if o["kind"] == "Secret"}
    pod = one(objects, "Deployment", "mt-cpu-pool")["spec"]["template"]["spec"]
    paths = {
        "/models": str(tmp_path / "models"),
        "/etc/modeltainer": str(tmp_path / "etc"),
        "/cache": str(tmp_path / "cache"),
    }
    config = one(objects, "ConfigMap", "mt-cpu-pool-config")["data"]
    plan = json.loads(_mapped(config["plan.json"], paths))
    port = _free_port()
    plan["cluster"]["port"] = port  # the pod's port is its own network's; here it is shared
    Path(paths["/etc/modeltainer"]).mkdir()
    (Path(paths["/etc/modeltainer"]) / "plan.json").write_text(json.dumps(plan))
    for init in pod["initContainers"]:  # what fetch_weights.py leaves: a link per model
        settings = {e["name"]: e["value"] for e in init["env"] if "value" in e}
        weights = Path(_mapped(settings["MT_WEIGHTS_DIR"], paths))
        weights.mkdir(parents=True)
        (weights / "model.gguf").symlink_to(gemma_gguf)
    (container,) = pod["containers"]
    argv = [_mapped(a, paths) for a in container["command"]]
    assert argv[:3] == ["python", "-m", "hpc.job.swappool"]
    env = _resolve_env(container, secrets, paths)
    proc = subprocess.Popen(
        [sys.executable, *argv[1:]],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"on port {port} (plain HTTP)" in line, line + proc.stdout.read()
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_rendered_pool_pod_serves_plain_http_behind_its_key(pool_pod: str) -> None:
    """The pool's port as the gateway and the kubelet see it: /health open, all else keyed."""
    async with aiohttp.ClientSession() as client:
        async with client.get(pool_pod + "/health") as resp:  # the kubelet's probes: no key
            assert resp.status == 200
        async with client.get(pool_pod + "/v1/models") as resp:
            assert resp.status == 401
        async with client.post(pool_pod + CHAT, json=chat("gemma-a")) as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        async with client.get(pool_pod + "/v1/models", headers=auth) as resp:
            listed = [m["id"] for m in (await resp.json())["data"]]
            assert listed == ["gemma-a", "gemma-b"]
        for model in ("gemma-a", "gemma-b"):  # the second evicts the first: one slot
            body = {**chat(model), "max_tokens": 4}
            async with client.post(pool_pod + CHAT, json=body, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["model"] == model
        async with client.get(pool_pod + "/pool/status", headers=auth) as resp:
            status = await resp.json()
        async with client.get(pool_pod + "/metrics") as resp:
            assert resp.status == 401
        async with client.get(pool_pod + "/metrics", headers=auth) as resp:  # the monitor's
            assert resp.status == 200
            metrics = await resp.text()
    assert [c["loads"] for c in status["catalogue"]] == [1, 1]
    assert 'mt_pool_model_loads_total{model="gemma-a"} 1' in metrics
    assert 'mt_pool_model_loaded{model="gemma-a"} 0' in metrics  # evicted by gemma-b
    assert 'mt_pool_model_loaded{model="gemma-b"} 1' in metrics
    assert "mt_pool_requests_in_flight 0" in metrics


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_the_rendered_gateway_routes_the_catalogue_to_the_rendered_pool(
    tmp_path: Path, pool_pod: str, tiny_objects: list[dict[str, Any]]
) -> None:
    """The gateway pod's rendered models.yaml and env, run here in front of the pool pod:
    a client key asks for each catalogue name; the gateway sends the pool's key."""
    objects = tiny_objects
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects if o["kind"] == "Secret"}
    pod = one(objects, "Deployment", "mt-gateway")["spec"]["template"]["spec"]
    paths = {
        p: str(tmp_path / p.strip("/").replace("/", "-")) for p in ("/var/lib/mt", "/etc/mt/models")
    }
    home = Path(paths["/var/lib/mt"]) / "home"
    home.mkdir(parents=True, mode=0o700)
    alice = "mt-alice-key-for-the-pool"
    keys = {"keys": [{"name": "alice", "sha256": hashlib.sha256(alice.encode()).hexdigest()}]}
    (home / "keys.yaml").write_text(yaml.safe_dump(keys))  # what the init container copies
    (home / "keys.yaml").chmod(0o600)
    models = yaml.safe_load(one(objects, "ConfigMap", "mt-gateway-models")["data"]["models.yaml"])
    for entry in models["static"]:
        assert entry["base_url"] == "http://mt-cpu-pool.llm.svc:8000/v1"
        entry["base_url"] = pool_pod + "/v1"  # the Service's DNS name resolves in a cluster
    Path(paths["/etc/mt/models"]).mkdir()
    (Path(paths["/etc/mt/models"]) / "models.yaml").write_text(yaml.safe_dump(models))
    (container,) = pod["containers"]
    env = _resolve_env(container, secrets, paths)
    with _pod_gateway(container, env, paths) as url:
        async with aiohttp.ClientSession() as client:
            auth = {"Authorization": f"Bearer {alice}"}
            for model in ("gemma-b", "gemma-a"):
                body = {**chat(model), "max_tokens": 4}
                async with client.post(url + CHAT, json=body, headers=auth) as resp:
                    assert resp.status == 200, await resp.text()
            async with client.get(url + "/v1/models", headers=auth) as resp:
                listed = {m["id"] for m in (await resp.json())["data"]}
    assert {"gemma-a", "gemma-b"} <= listed
