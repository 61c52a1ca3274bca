"""The seed layouts of docs/kubernetes.md, each rendered from its own models.yaml + site.yaml.

Seed 000: one llama.cpp model on OpenShift behind the gateway's Route; seed 001: the
inference layer (gateway replicas, three engines, NetworkPolicies, monitoring, discovery);
seed 002: three GPU nodes, two pinned models and a swap pool (the pool's own checks, its pod
run with a real llama-server, are tests/test_kubernetes_pool.py's); seed 003: the models
LlamaStack on OpenShift AI reaches through the gateway. For each: the golden
tree under tests/golden/k8s/seed-00N (all but the secrets), every object against its schema
(Kubernetes' own, or the CRD's: tests/schemas/), ``kubectl kustomize`` builds it, ``mt
render`` writes the same tree, and what the docs' component table says of the seed holds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtcli import mt
from realparts import missing_part
from test_kubernetes_layout import _admits, _pods
from test_kubernetes_manifests import (
    CLIENT_KEYS,
    GOLDEN,
    KEY,
    METRICS_TOKEN,
    check_golden,
    validate,
)

from hpc.configfile import load_models
from hpc.k8s.kustomize import layout_tree, write_tree
from hpc.k8s.naming import slug
from hpc.site import SiteConfig
from hpc.spec import ModelsFile, ModelSpec, PoolSpec

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
# What docs/kubernetes.md renders of each seed: `mt render --backend kubernetes NAMES`.
SEEDS: dict[str, tuple[str, ...]] = {
    "seed-000": ("qwen3-8b",),
    "seed-001": ("llama-3.1-8b", "qwen2.5-coder-32b", "embed"),
    "seed-002": ("qwen3-coder-30b", "gpt-oss-20b", "swap"),  # swap: the pool
    "seed-003": ("granite-3.3-8b", "llama-3.1-8b"),
}
GATEWAY = "mt-gateway"


def seed(name: str) -> tuple[ModelsFile, SiteConfig]:
    """A seed's models.yaml and site.yaml, as `mt` reads them."""
    models = load_models(EXAMPLES / name / "models.yaml")
    text = (EXAMPLES / name / "site.yaml").read_text("utf-8")
    return models, SiteConfig.model_validate(yaml.safe_load(text))


def specs_of(name: str) -> list[ModelSpec]:
    """The models a seed renders (its pools apart: :func:`pools_of`)."""
    models, _ = seed(name)
    found = [models.get(model) for model in SEEDS[name] if models.pool(model) is None]
    assert None not in found, f"{name}: a name the docs render is not in its models.yaml"
    return [spec for spec in found if spec is not None]


def pools_of(name: str) -> list[tuple[PoolSpec, list[ModelSpec]]]:
    """The swap pools a seed renders, each with its catalogue."""
    models, _ = seed(name)
    pools = [models.pool(model) for model in SEEDS[name]]
    return [(pool, list(models.catalogue(pool))) for pool in pools if pool is not None]


def seed_tree(name: str) -> dict[str, str]:
    """The tree `mt render --backend kubernetes NAMES` writes (fixed keys for the goldens)."""
    _, site = seed(name)
    return layout_tree(
        specs_of(name),
        api_keys=dict.fromkeys(SEEDS[name], KEY),
        client_keys=CLIENT_KEYS,
        metrics_token=METRICS_TOKEN,
        site=site.kubernetes,
        pools=pools_of(name),
    )


def parsed(files: dict[str, str]) -> list[dict[str, Any]]:
    """Every object of a tree (no Kustomizations)."""
    docs = [d for rel, t in files.items() if rel.endswith(".yaml") for d in yaml.safe_load_all(t)]
    return [d for d in docs if d["kind"] != "Kustomization"]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def engines(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The engines' Deployments, by name."""
    return {n: d for n, d in of_kind(objects, "Deployment").items() if n != GATEWAY}


def pod_of(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


# --- every seed: golden tree, schemas, kustomize, mt render -------------------------------


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_golden_tree_and_schemas(name: str, tmp_path: Path) -> None:
    files = seed_tree(name)
    for obj in parsed(files):
        validate(obj)
    golden = GOLDEN / name
    for rel, text in files.items():
        if not rel.endswith("secret.yaml"):  # gitignored by the tree itself
            check_golden(golden / rel, text)
    on_disk = sorted(str(p.relative_to(golden)) for p in golden.rglob("*") if p.is_file())
    assert on_disk == sorted(rel for rel in files if not rel.endswith("secret.yaml"))
    write_tree(tmp_path, files)
    for secret in tmp_path.rglob("secret.yaml"):
        assert secret.stat().st_mode & 0o077 == 0  # keys


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_kubectl_kustomize_builds_the_seed(name: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_part("kubectl", "kubectl is not on PATH")
        raise AssertionError("unreachable")
    files = seed_tree(name)
    write_tree(tmp_path / "k8s", files)
    built = subprocess.run(
        [kubectl, "kustomize", str(tmp_path / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    for doc in docs:
        validate(doc)
    expected = sorted((o["kind"], o["metadata"]["name"]) for o in parsed(files))
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == expected
    assert {d["metadata"]["namespace"] for d in docs} == {"llm"}


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_mt_render_writes_the_seed(name: str, tmp_path: Path) -> None:
    """The command docs/kubernetes.md shows, through the real CLI: the same files, the same
    text in every one that holds no key."""
    out = tmp_path / "k8s"
    keys = tmp_path / "keys.yaml"
    keys.write_text(CLIENT_KEYS, encoding="utf-8")
    keys.chmod(0o600)
    done = mt(
        "--models",
        str(EXAMPLES / name / "models.yaml"),
        "--site",
        str(EXAMPLES / name / "site.yaml"),
        "render",
        "--backend",
        "kubernetes",
        "--keys",
        str(keys),
        "-o",
        str(out),
        *SEEDS[name],
    )
    assert "kubectl apply -k" in " ".join(done.stderr.split())
    expected = seed_tree(name)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(expected)
    for rel, text in expected.items():
        if not rel.endswith("secret.yaml"):
            assert (out / rel).read_text(encoding="utf-8") == text, rel


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_gateway_is_the_only_way_in(name: str) -> None:
    """A Route or Ingress reaches the gateway and nothing else; each engine admits only the
    gateway's pods (and Prometheus' namespace when it is monitored)."""
    objects = parsed(seed_tree(name))
    _, site = seed(name)
    targets = [o["spec"]["to"]["name"] for o in of_kind(objects, "Route").values()]
    for ingress in of_kind(objects, "Ingress").values():
        for rule in ingress["spec"]["rules"]:
            targets += [p["backend"]["service"]["name"] for p in rule["http"]["paths"]]
    assert targets == [GATEWAY]
    pods = _pods(objects)
    policies = of_kind(objects, "NetworkPolicy")
    assert set(policies) == {GATEWAY, *engines(objects)}
    for engine in engines(objects):
        peers = [p for rule in policies[engine]["spec"]["ingress"] for p in rule["from"]]
        admitted = {d for d, ns, labels in pods for p in peers if _admits(p, ns, labels)}
        assert admitted == {GATEWAY}, engine
        others = [p for p in peers if "podSelector" not in p]
        monitoring = site.kubernetes.monitoring
        prometheus = {"kubernetes.io/metadata.name": monitoring.prometheus_namespace}
        expected = [{"namespaceSelector": {"matchLabels": prometheus}}]
        assert others == (expected if monitoring.enabled else []), engine


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_each_engine_has_its_volume_download_and_probes(name: str) -> None:
    """A PVC for the weights, the init container that fetches them (no install at pod start),
    startup/readiness/liveness probes on /health, the startup budget its load time."""
    objects = parsed(seed_tree(name))
    claims = of_kind(objects, "PersistentVolumeClaim")
    # A model's pod fetches its weights; a pool's fetches each catalogue model's, and its
    # startup budget is the slowest one's.
    served: list[tuple[str, list[ModelSpec]]] = [(s.name, [s]) for s in specs_of(name)]
    served += [(pool.name, catalogue) for pool, catalogue in pools_of(name)]
    assert sorted(f"mt-{slug(n)}" for n, _ in served) == sorted(engines(objects))
    for served_name, fetched in served:
        pod = pod_of(engines(objects)[f"mt-{slug(served_name)}"])
        (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert volume["persistentVolumeClaim"]["claimName"] in claims
        fetches = pod["initContainers"]
        assert len(fetches) == len(fetched)
        for fetch in fetches:
            assert fetch["name"].startswith("fetch-")
            assert fetch["command"] == ["python3", "/etc/modeltainer/fetch_weights.py"]
        (engine,) = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert engine[probe]["httpGet"]["path"] == "/health"
        startup = engine["startupProbe"]
        slowest_s = max(spec.startup_timeout_s for spec in fetched)
        assert startup["failureThreshold"] * startup["periodSeconds"] >= slowest_s
        assert pod["terminationGracePeriodSeconds"] >= 60


# --- what each seed is for ----------------------------------------------------------------


def test_seed_000_one_llamacpp_model_on_openshift_behind_the_route() -> None:
    objects = parsed(seed_tree("seed-000"))
    (route,) = of_kind(objects, "Route").values()
    assert route["spec"]["to"] == {"kind": "Service", "name": GATEWAY, "weight": 100}
    assert route["spec"]["host"] == "llm.apps.example.org"
    assert route["metadata"]["annotations"] == {"haproxy.router.openshift.io/timeout": "3600s"}
    assert route["spec"]["tls"]["termination"] == "edge"
    (engine,) = engines(objects).values()
    assert pod_of(engine)["containers"][0]["image"] == "ghcr.io/ggml-org/llama.cpp:server-cuda"
    for deployment in of_kind(objects, "Deployment").values():  # OpenShift's SCC picks UIDs
        assert "runAsUser" not in pod_of(deployment)["securityContext"]
    # Monitoring is off: no ServiceMonitor or rule a cluster without the operator refuses.
    assert not {"ServiceMonitor", "PrometheusRule"} & {o["kind"] for o in objects}
    assert of_kind(objects, "PodDisruptionBudget")[GATEWAY]["spec"]["maxUnavailable"] == 1


def test_seed_001_the_inference_layer() -> None:
    objects = parsed(seed_tree("seed-001"))
    gateway = of_kind(objects, "Deployment")[GATEWAY]
    assert gateway["spec"]["replicas"] == 3
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert GATEWAY in of_kind(objects, "PodDisruptionBudget")
    # Discovery: its own account, a read-only Role; only its pod has a token.
    assert GATEWAY in of_kind(objects, "ServiceAccount") and GATEWAY in of_kind(objects, "Role")
    for name, deployment in of_kind(objects, "Deployment").items():
        assert pod_of(deployment)["automountServiceAccountToken"] is (name == GATEWAY)
    command = pod_of(gateway)["containers"][0]["command"]
    assert command[-4:] == ["--discover", "kubernetes:llm", "--discover-interval", "30"]
    # The Ingress keeps long streams open and unbuffered.
    (ingress,) = of_kind(objects, "Ingress").values()
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # Open WebUI's namespace may call the gateway; an engine's namespace may not.
    peers = [
        p for r in of_kind(objects, "NetworkPolicy")[GATEWAY]["spec"]["ingress"] for p in r["from"]
    ]
    assert any(_admits(p, "open-webui", {}) for p in peers)
    assert not any(_admits(p, "llm", {}) for p in peers)
    # GPUs by type through the site's label; the CPU model gets llama.cpp's CPU image.
    by_name = engines(objects)
    assert pod_of(by_name["mt-llama-3-1-8b"])["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"
    }
    coder = pod_of(by_name["mt-qwen2-5-coder-32b"])
    assert coder["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert coder["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    embed = pod_of(by_name["mt-embed"])["containers"][0]
    assert embed["image"] == "ghcr.io/ggml-org/llama.cpp:server"
    assert "nvidia.com/gpu" not in embed["resources"]["limits"]
    # Monitoring: the gateway and every engine scraped; an alert per model; the dashboard.
    assert set(of_kind(objects, "ServiceMonitor")) == {GATEWAY, *by_name}
    (rules,) = of_kind(objects, "PrometheusRule").values()
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"]]
    no_replica = [r["expr"] for r in alerts if r["alert"] == "MTModelNoReadyReplica"]
    for name in by_name:
        assert any(f'deployment="{name}"' in expr for expr in no_replica), name
    assert {"MTModelErrorRatio", "MTModelSlowFirstToken", "MTGPUPodPending"} <= {
        r["alert"] for r in alerts
    }
    dashboards = [
        c
        for c in of_kind(objects, "ConfigMap").values()
        if c["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    assert len(dashboards) == 1


def test_seed_003_llamastack_reaches_the_models_through_the_gateway() -> None:
    """LlamaStack's OpenAI-type provider points at the gateway's Service: its namespace is
    admitted, that Service is where docs/kubernetes.md says, and the gateway routes both
    models to their engines."""
    objects = parsed(seed_tree("seed-003"))
    service = of_kind(objects, "Service")[GATEWAY]
    (port,) = service["spec"]["ports"]
    url = f"http://{GATEWAY}.{service['metadata']['namespace']}.svc:{port['port']}/v1"
    assert url == "http://mt-gateway.llm.svc:8081/v1"
    assert url in (EXAMPLES.parent / "kubernetes.md").read_text(encoding="utf-8")
    peers = [
        p for r in of_kind(objects, "NetworkPolicy")[GATEWAY]["spec"]["ingress"] for p in r["from"]
    ]
    assert any(_admits(p, "llamastack", {}) for p in peers)
    config = of_kind(objects, "ConfigMap")["mt-gateway-models"]["data"]["models.yaml"]
    routed = ModelsFile.model_validate(yaml.safe_load(config))
    backends = {s.name: s.base_url for s in routed.static}
    assert backends == {
        "granite-3.3-8b": "http://mt-granite-3-3-8b.llm.svc:8000/v1",
        "llama-3.1-8b": "http://mt-llama-3-1-8b.llm.svc:8000/v1",
    }
    # OpenShift's user workload monitoring scrapes every engine (and may reach it).
    assert set(of_kind(objects, "ServiceMonitor")) == {GATEWAY, *engines(objects)}
    for deployment in of_kind(objects, "Deployment").values():
        assert "runAsUser" not in pod_of(deployment)["securityContext"]


# --- the docs say what the tests check -------------------------------------------------------


def _seeds_section() -> str:
    text = (EXAMPLES.parent / "kubernetes.md").read_text(encoding="utf-8")
    start = text.index("## The seed layouts")
    return text[start : text.index("\n## ", start + 1)]


def test_the_docs_render_each_seed_as_tested() -> None:
    """Each seed's `mt render` line in docs/kubernetes.md names its files and the models
    these tests render."""
    section = _seeds_section()
    for name, models in SEEDS.items():
        command = (
            f"mt --models docs/examples/{name}/models.yaml --site docs/examples/{name}/site.yaml"
            f" render --backend kubernetes -o k8s {' '.join(models)}"
        )
        assert command in " ".join(section.replace("\\\n", " ").split()), name


def test_the_component_tables_name_modules_and_tests_that_exist() -> None:
    section = _seeds_section()
    assert section.count("| component | rendered by | checked by |") == 4  # one per seed
    tests = Path(__file__).resolve().parent
    defined = {
        name
        for path in tests.glob("test_*.py")
        for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text("utf-8"), re.M)
    }
    named = set(re.findall(r"`(test_\w+)`", section))
    assert len(named) > 20
    assert named <= defined, sorted(named - defined)
    repo = tests.parent
    for module in set(re.findall(r"`([a-z_/]+\.py)`", section)):
        candidates = [repo / module, repo / "hpc" / "k8s" / module, tests / module]
        assert any(c.is_file() for c in candidates), module
