"""The Kubernetes backend against the fake API server, through the official client."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("kubernetes", reason="pip install -e '.[kubernetes]'")

from fake_k8s_api import FakeKubeAPI
from mtcli import mt

from gateway.keys import create_key
from hpc import jobs, waiting
from hpc.backends.kubernetes import KubernetesBackend
from hpc.errors import MTError
from hpc.jobs import JobService
from hpc.k8s.apierrors import KubernetesError
from hpc.registry import Registry, record_key
from hpc.site import Site, SiteConfig
from hpc.spec import ModelsFile, ModelSpec

NS = "llm"
SPEC = ModelSpec.model_validate(
    {
        "name": "gemma-3-270m",
        "engine": "llamacpp",
        "weights": {"source": "ggml-org/gemma-3-270m-GGUF", "quant": "Q4_K_M"},
        "resources": {"gpus": 1, "cpus": 2, "mem_gb": 4},
        "kubernetes": {"namespace": NS, "role": "swap"},
    }
)


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as fake:
        yield fake


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """A site with a client key (the gateway that submit applies needs its keys.yaml)."""
    site = Site(SiteConfig(), tmp_path / "mt-home")
    create_key(site.keys_file, "alice")
    return site


# What the first submit of a namespace adds beside the job's own objects, and keeps.
GATEWAY = {
    "deployments": ["mt-gateway"],
    "services": ["mt-gateway"],
    "secrets": ["mt-gateway-keys"],
    "configmaps": ["mt-gateway-models", "mt-grafana-dashboard"],
    "networkpolicies": ["mt-gateway"],
    "poddisruptionbudgets": ["mt-gateway"],
    "ingresses": ["mt-gateway"],
    "servicemonitors": ["mt-gateway"],
    "prometheusrules": ["mt-alerts"],
    # It finds the jobs from the API (gateway.k8sdiscovery), as its own account.
    "serviceaccounts": ["mt-gateway"],
    "roles": ["mt-gateway"],
    "rolebindings": ["mt-gateway"],
}


def job_names(api: FakeKubeAPI, plural: str) -> list[str]:
    """The stored objects of one kind in NS that are not the gateway's."""
    return [n for n in api.names(plural, NS) if n not in GATEWAY.get(plural, [])]


@pytest.fixture
def backend(
    api: FakeKubeAPI, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> JobService:
    """The Kubernetes backend behind the job service (which writes and moves its records)."""
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
    backend = jobs.service(site, "kubernetes")
    assert isinstance(backend.scheduler, KubernetesBackend)
    return backend


def test_submit_available_ready_cancel_gone(
    api: FakeKubeAPI, backend: JobService, site: Site
) -> None:
    handle = backend.submit(SPEC)
    name = handle.job_id
    assert name == f"mt-gemma-3-270m-{handle.nonce}"
    assert job_names(api, "deployments") == [name]
    assert job_names(api, "services") == [name]
    assert job_names(api, "secrets") == [f"{name}-key"]
    assert job_names(api, "configmaps") == [f"{name}-config"]
    assert job_names(api, "networkpolicies") == [name]
    assert job_names(api, "servicemonitors") == [name]
    assert api.names("persistentvolumeclaims", NS) == ["mt-gemma-3-270m-weights"]
    for plural, names in GATEWAY.items():  # the gateway in front, applied with the job
        assert set(names) <= set(api.names(plural, NS)), plural
    assert api.names("routes", NS) == []  # nothing exposes the engine itself

    registry = Registry(site.registry_dir)
    key = record_key("kubernetes", name)
    record = registry.read(key)
    assert record is not None
    assert record.state == "pending"
    assert record.node == f"{name}.{NS}.svc"
    assert record.base_url is None

    # The key is in the Secret and reaches the engine by secretKeyRef, never by argv.
    dep = api.deployment(name, NS)
    assert dep is not None
    engine = dep["spec"]["template"]["spec"]["containers"][0]
    assert record.api_key.get_secret_value() not in json.dumps(dep)
    key_ref = {"secretKeyRef": {"name": f"{name}-key", "key": "api-key"}}
    assert {"name": "LLAMA_API_KEY", "valueFrom": key_ref} in engine["env"]

    assert backend.status([handle])[name].state == "pending"
    api.set_running(name, NS)
    assert backend.status([handle])[name].state == "running"
    assert registry.read(key).state == "starting"  # type: ignore[union-attr]

    api.set_available(name, NS)
    assert backend.status([handle])[name].state == "running"
    ready = registry.read(key)
    assert ready is not None
    assert ready.state == "ready"
    assert ready.base_url == f"http://{name}.{NS}.svc:8000/v1"

    # wait_ready (what `mt submit --wait` runs) sees it through the same status call.
    assert waiting.wait_ready(site, handle, timeout_s=5).state == "ready"

    gone = jobs.cancel(site, name)
    assert gone.state == "gone"
    for plural in ("deployments", "services", "secrets", "configmaps", "networkpolicies"):
        assert job_names(api, plural) == [], plural
    assert job_names(api, "servicemonitors") == []
    assert [p for p in api.names("pods", NS) if p.startswith(name)] == []
    for plural, names in GATEWAY.items():  # the gateway stays for the namespace's next job
        assert api.names(plural, NS) == names, plural
    assert api.names("persistentvolumeclaims", NS) == ["mt-gemma-3-270m-weights"]  # a cache
    assert backend.status([handle])[name].state == "missing"


def test_status_is_one_list_per_namespace(api: FakeKubeAPI, backend: JobService) -> None:
    handles = [backend.submit(SPEC) for _ in range(3)]
    for h in handles:
        api.set_available(h.job_id, NS)
    api.requests.clear()
    states = backend.status(handles)
    assert {s.state for s in states.values()} == {"running"}
    assert api.requests == [("GET", f"/apis/apps/v1/namespaces/{NS}/deployments")]


def test_forbidden_is_translated_and_nothing_is_left(
    api: FakeKubeAPI, backend: JobService, site: Site
) -> None:
    api.fail(
        "POST",
        "deployments",
        403,
        'deployments.apps is forbidden: User "alice" cannot create resource "deployments" '
        f'in API group "apps" in the namespace "{NS}"',
    )
    with pytest.raises(KubernetesError) as info:
        backend.submit(SPEC)
    assert info.value.status == 403
    assert "forbidden" in info.value.message
    assert info.value.hint is not None
    assert f"kubectl auth can-i create deployments -n {NS}" in info.value.hint
    assert Registry(site.registry_dir).records() == []
    for plural in ("secrets", "configmaps", "persistentvolumeclaims", "deployments"):
        assert api.names(plural, NS) == [], plural


def test_quota_exceeded_hint(api: FakeKubeAPI, backend: JobService) -> None:
    api.fail(
        "POST",
        "deployments",
        403,
        'deployments "x" is forbidden: exceeded quota: gpu-quota, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: "
        "requests.nvidia.com/gpu=4",
    )
    with pytest.raises(KubernetesError) as info:
        backend.submit(SPEC)
    assert "quota exceeded" in info.value.message
    assert f"kubectl describe resourcequota -n {NS}" in (info.value.hint or "")


def test_unauthorized_hint(
    api: FakeKubeAPI, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = api.write_kubeconfig(tmp_path / "kubeconfig", NS)
    config.write_text(config.read_text().replace("fake-token", "stale"), encoding="utf-8")
    monkeypatch.setenv("KUBECONFIG", str(config))
    with pytest.raises(KubernetesError) as info:
        JobService(site, KubernetesBackend(site)).submit(SPEC)
    assert info.value.status == 401
    assert "log in again" in (info.value.hint or "")


def test_unschedulable_reason_names_the_label(api: FakeKubeAPI, backend: JobService) -> None:
    handle = backend.submit(SPEC)
    api.set_unschedulable(
        handle.job_id,
        NS,
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.",
    )
    status = backend.status([handle])[handle.job_id]
    assert status.state == "pending"
    assert "unschedulable" in status.reason
    assert "kubectl label node NODE ai.llm.role=swap" in status.reason


def test_deleted_behind_our_back_is_marked_gone(
    api: FakeKubeAPI, backend: JobService, site: Site
) -> None:
    handle = backend.submit(SPEC)
    api.objects.pop(("apps/v1", "deployments", NS, handle.job_id))
    views = jobs.job_views(site)
    assert [v.record.state for v in views] == ["gone"]
    assert views[0].scheduler.state == "missing"


def test_logs_of_the_engine_container(api: FakeKubeAPI, backend: JobService) -> None:
    handle = backend.submit(SPEC)
    (pod,) = [p for p in api.names("pods", NS) if p.startswith(handle.job_id)]
    api.pod_logs[pod] = "loading model\nserver listening\n"
    assert list(backend.logs(handle)) == ["loading model", "server listening"]
    assert list(backend.logs(handle, follow=True)) == ["loading model", "server listening"]


def test_an_engine_route_is_refused_before_anything_is_created(
    api: FakeKubeAPI, backend: JobService
) -> None:
    spec = SPEC.model_copy(
        update={"kubernetes": SPEC.kubernetes.model_copy(update={"route": True})}
    )
    with pytest.raises(MTError) as info:
        backend.submit(spec)
    assert "kubernetes.route" in info.value.message
    assert [m for m, _ in api.requests if m == "POST"] == []


def test_the_gateway_is_created_once_and_kept(api: FakeKubeAPI, backend: JobService) -> None:
    first = backend.submit(SPEC)
    (secret_before,) = [
        obj
        for (_, p, _, n), obj in api.objects.items()
        if p == "secrets" and n == "mt-gateway-keys"
    ]
    uid = secret_before["metadata"]["uid"]
    second = backend.submit(SPEC)
    assert job_names(api, "deployments") == sorted([first.job_id, second.job_id])
    assert api.names("deployments", NS).count("mt-gateway") == 1
    (secret_after,) = [
        obj
        for (_, p, _, n), obj in api.objects.items()
        if p == "secrets" and n == "mt-gateway-keys"
    ]
    assert secret_after["metadata"]["uid"] == uid  # not replaced: the first job's keys stay


def test_missing_monitoring_crds_are_named_and_nothing_is_left(
    api: FakeKubeAPI, backend: JobService, site: Site
) -> None:
    api.fail("POST", "servicemonitors", 404, "the server could not find the requested resource")
    with pytest.raises(KubernetesError) as info:
        backend.submit(SPEC)
    assert "ServiceMonitor" in info.value.message
    assert "kubernetes.monitoring.enabled: false" in (info.value.hint or "")
    assert Registry(site.registry_dir).records() == []
    for plural in ("secrets", "configmaps", "deployments", "services", "networkpolicies"):
        assert api.names(plural, NS) == [], plural


def test_a_site_without_the_gateway_on_submit_creates_only_the_job(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = SiteConfig.model_validate(
        {"kubernetes": {"gateway": {"apply_on_submit": False}, "monitoring": {"enabled": False}}}
    )
    site = Site(config, tmp_path / "no-keys-home")  # no keys.yaml: not needed
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
    handle = JobService(site, KubernetesBackend(site)).submit(SPEC)
    assert api.names("deployments", NS) == [handle.job_id]
    assert api.names("networkpolicies", NS) == [handle.job_id]
    assert api.names("servicemonitors", NS) == []
    assert api.names("secrets", NS) == [f"{handle.job_id}-key"]


def test_submit_without_client_keys_says_how_to_make_them(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = Site(SiteConfig(), tmp_path / "empty-home")
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
    with pytest.raises(MTError) as info:
        JobService(site, KubernetesBackend(site)).submit(SPEC)
    assert "mt keys create" in (info.value.hint or "")
    assert api.requests == []


def test_no_kubeconfig_is_a_clear_error(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubernetesError) as info:
        JobService(site, KubernetesBackend(site)).submit(SPEC)
    assert "KUBECONFIG" in (info.value.hint or "")


# --- swap pools ----------------------------------------------------------------------------

POOL_MODELS = ModelsFile.model_validate(
    {
        "models": [
            {"name": name, "engine": "llamacpp", "weights": {"source": "a/b", "quant": "Q4_K_M"}}
            for name in ("pool-a", "pool-b")
        ],
        "pools": [
            {
                "name": "swap",
                "models": ["pool-a", "pool-b"],
                "resources": {"gpus": 1, "cpus": 4, "mem_gb": 16},
                "kubernetes": {
                    "namespace": NS,
                    "role": "swap",
                    "gpu_resource": "amd.com/gpu",
                    "image": "registry.example.org/modeltainer-pool:0.1.0-rocm",
                },
            }
        ],
    }
)


def test_a_pool_is_one_deployment_serving_its_catalogue(
    api: FakeKubeAPI, backend: JobService, site: Site
) -> None:
    pool = POOL_MODELS.pool("swap")
    assert pool is not None
    handle = backend.submit_pool(pool, POOL_MODELS.catalogue(pool))
    name = handle.job_id
    assert name == f"mt-swap-{handle.nonce}"
    assert job_names(api, "deployments") == [name]
    assert job_names(api, "services") == [name]
    assert job_names(api, "secrets") == [f"{name}-key"]
    assert job_names(api, "configmaps") == [f"{name}-config"]
    assert job_names(api, "networkpolicies") == [name]
    assert job_names(api, "servicemonitors") == [name]  # the pool's own /metrics
    assert api.names("persistentvolumeclaims", NS) == ["mt-swap-weights"]

    dep = api.deployment(name, NS)
    assert dep is not None
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["python", "-m", "hpc.job.swappool"]
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-0-pool-a", "fetch-1-pool-b"]
    registry = Registry(site.registry_dir)
    key = record_key("kubernetes", name)
    record = registry.read(key)
    assert record is not None
    assert (record.engine, record.serves) == ("pool", ("pool-a", "pool-b"))
    assert record.api_key.get_secret_value() not in json.dumps(dep)
    (secret,) = [
        obj for (_, p, _, n), obj in api.objects.items() if p == "secrets" and n == f"{name}-key"
    ]
    stored = base64.b64decode(secret["data"]["api-key"]).decode()  # as a real server stores it
    assert stored == record.api_key.get_secret_value()

    api.set_available(name, NS)
    assert backend.status([handle])[name].state == "running"
    ready = registry.read(key)
    assert ready is not None
    assert (ready.state, ready.base_url) == ("ready", f"http://{name}.{NS}.svc:8000/v1")

    gone = jobs.cancel(site, name)
    assert gone.state == "gone"
    for plural in ("deployments", "services", "secrets", "configmaps", "networkpolicies"):
        assert job_names(api, plural) == [], plural
    assert job_names(api, "servicemonitors") == []
    assert api.names("persistentvolumeclaims", NS) == ["mt-swap-weights"]  # the weights stay


def test_a_pool_dry_run_shows_its_objects_and_creates_nothing(
    api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mt submit POOL --backend kubernetes --dry-run`, through the real CLI."""
    models = tmp_path / "models.yaml"
    models.write_text(json.dumps(POOL_MODELS.model_dump(mode="json", exclude_defaults=True)))
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
    done = mt("--models", str(models), "submit", "swap", "--backend", "kubernetes", "--dry-run")
    docs = list(yaml.safe_load_all(done.stdout))
    kinds = [d["kind"] for d in docs]
    assert kinds[:7] == [
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "ServiceMonitor",
    ]
    assert docs[0]["stringData"] == {"api-key": "<per-job key, made at submit>"}
    assert "hpc.job.swappool" in docs[3]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert api.requests == []
