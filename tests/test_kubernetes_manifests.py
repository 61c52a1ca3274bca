"""Rendered Kubernetes manifests: golden files, Kubernetes' own schemas, the rules they keep."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpc.configfile import load_models
from hpc.errors import MTError
from hpc.k8s.kustomize import layout_tree, to_yaml, write_tree
from hpc.k8s.manifests import engine_image, model_objects
from hpc.k8s.naming import names_for
from hpc.k8s.settings import KubernetesSite
from hpc.k8s.stack import model_group
from hpc.spec import ModelSpec

GOLDEN = Path(__file__).parent / "golden" / "k8s"
UPDATE = os.environ.get("MT_UPDATE_GOLDEN") == "1"  # read before the env is cleaned
EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "kustomize" / "models.yaml"
KEY = "mtj-GOLDEN-KEY"
METRICS_TOKEN = "mt-GOLDEN-METRICS-TOKEN"
CLIENT_KEYS = "keys:\n- name: alice\n  sha256: " + "ab" * 32 + "\n"
NONCE = "0123abcd"
K8S_VERSION = "1.30"

# A site that maps GPU types to the label NVIDIA's GPU feature discovery sets on nodes.
SITE = KubernetesSite(
    gpu_type_label="nvidia.com/gpu.product", gpu_types={"a100": "NVIDIA-A100-SXM4-80GB"}
)

CASES: dict[str, dict[str, Any]] = {
    "vllm_two_gpus_a100": {
        "name": "Qwen3-Coder-30B-A3B",
        "engine": "vllm",
        "weights": {"source": "Qwen/Qwen3-Coder-30B-A3B-Instruct", "revision": "main"},
        "engine_args": ["--max-model-len", "32768"],
        "resources": {"gpus": 2, "gpu_type": "a100", "cpus": 16, "mem_gb": 128},
        "startup_timeout_s": 1800,
        "kubernetes": {
            "namespace": "llm",
            "role": "coder",
            "node_selector": {"topology.kubernetes.io/zone": "zone-a"},
            "storage_class": "fast-ssd",
        },
    },
    "llamacpp_amd_shared_pvc": {
        "name": "gemma-3-270m",
        "engine": "llamacpp",
        "weights": {"source": "ggml-org/gemma-3-270m-GGUF", "quant": "Q4_K_M"},
        "resources": {"gpus": 1, "cpus": 2, "mem_gb": 4},
        "startup_timeout_s": 300,
        "kubernetes": {"gpu_resource": "amd.com/gpu", "pvc": "shared-models", "run_as_user": None},
    },
    "llamacpp_cpu": {
        "name": "tiny-cpu",
        "engine": "llamacpp",
        "weights": {"source": "ggml-org/gemma-3-270m-GGUF", "quant": "q8_0"},
    },
}


def objects(case: str) -> list[dict[str, Any]]:
    """The model's whole group as `mt submit` creates it: engine, NetworkPolicy, monitor."""
    spec = ModelSpec.model_validate(CASES[case])
    names = names_for(spec, namespace=spec.kubernetes.namespace or "default", nonce=NONCE)
    ns = names.namespace
    return model_group(spec, names, api_key=KEY, site=SITE, gateway_namespace=ns, nonce=NONCE)


def check_golden(path: Path, text: str) -> None:
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"


# CRDs' kinds (the prometheus-operator's, OpenShift's Route) are not in kubernetes-validate:
# their own schemas, made from the CRDs and shipped with their sources in tests/schemas/.
SCHEMAS = Path(__file__).parent / "schemas"
CRD_GROUPS = ("route.openshift.io/", "monitoring.coreos.com/")


@functools.cache
def crd_validator(api_version: str, kind: str) -> Any:
    """The strict JSON-schema validator of one CRD kind (tests/schemas/README.md)."""
    jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[dev]'")
    group, _, version = api_version.partition("/")
    path = SCHEMAS / group / f"{kind.lower()}_{version}.json"
    # A CRD kind without a shipped schema fails: nothing rendered goes unchecked.
    assert path.is_file(), f"no schema for {api_version} {kind}: add it (tests/schemas/README.md)"
    schema = json.loads(path.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def validate(obj: dict[str, Any]) -> None:
    """Against Kubernetes' JSON schemas (strict: unknown fields fail), shipped in the package,
    or a CRD's own (tests/schemas/)."""
    if obj["apiVersion"].startswith(CRD_GROUPS):
        errors = sorted(
            crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj), key=lambda e: e.path
        )
        assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
        return
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]'")
    kv.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_and_schema(case: str) -> None:
    objs = objects(case)
    for obj in objs:
        validate(obj)
    check_golden(GOLDEN / f"{case}.yaml", "---\n".join(to_yaml(o) for o in objs))


def test_example_layout_golden_tree(tmp_path: Path) -> None:
    """The gateway, the monitoring, and two pinned models and a swap pool, one directory
    each, as `mt render` writes them."""
    specs = load_models(EXAMPLE).models
    files = layout_tree(
        specs,
        api_keys={s.name: KEY for s in specs},
        client_keys=CLIENT_KEYS,
        metrics_token=METRICS_TOKEN,
        site=SITE,
    )
    write_tree(tmp_path, files)
    for rel, text in files.items():
        if rel.endswith(".yaml"):
            for doc in yaml.safe_load_all(text):
                if doc.get("kind") != "Kustomization":
                    validate(doc)
        # secret.yaml is gitignored (by the .gitignore the tree itself holds), so it has no
        # golden file here; the single-model golden files above show the Secret.
        if not rel.endswith("secret.yaml"):
            check_golden(GOLDEN / "layout" / rel, text)
    layout = GOLDEN / "layout"
    on_disk = sorted(str(p.relative_to(layout)) for p in layout.rglob("*") if p.is_file())
    assert on_disk == sorted(rel for rel in files if not rel.endswith("secret.yaml"))
    assert (tmp_path / "swap-pool" / "secret.yaml").stat().st_mode & 0o077 == 0  # the key


def test_layout_puts_each_model_on_its_own_nodes() -> None:
    specs = load_models(EXAMPLE).models
    roles = []
    for spec in specs:
        names = names_for(spec, namespace="llm")
        (dep,) = [o for o in model_objects(spec, names, api_key=KEY) if o["kind"] == "Deployment"]
        terms = dep["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"]
        roles.append(terms[0]["matchExpressions"][0]["values"][0])
    assert roles == ["coder", "chat", "swap"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_pod_rules(case: str) -> None:
    spec = ModelSpec.model_validate(CASES[case])
    (dep,) = [o for o in objects(case) if o["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
    (engine,) = pod["containers"]
    startup = engine["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= spec.startup_timeout_s
    assert KEY not in json.dumps([o for o in objects(case) if o["kind"] != "Secret"])
    assert any(e.get("valueFrom", {}).get("secretKeyRef") for e in engine["env"])
    gpus = engine["resources"]["limits"].get(spec.kubernetes.gpu_resource)
    assert gpus == (str(spec.resources.gpus) if spec.resources.gpus else None)
    model_arg = engine["args"][1] if spec.engine == "llamacpp" else engine["args"][0]
    assert model_arg in ("/models/weights/model.gguf", "/models/weights/model")


def test_hostile_model_name_stays_a_value() -> None:
    """A name with characters Kubernetes names forbid is slugged; the value is kept as data."""
    spec = ModelSpec.model_validate(
        {"name": "My.Model:v2+beta", "engine": "llamacpp", "weights": {"source": "a/b; echo x"}}
    )
    names = names_for(spec, namespace="default", nonce=NONCE)
    assert names.instance == f"mt-my-model-v2-beta-{NONCE}"
    for obj in model_objects(spec, names, api_key=KEY, nonce=NONCE):
        validate(obj)
    (cm,) = [o for o in model_objects(spec, names, api_key=KEY) if o["kind"] == "ConfigMap"]
    assert cm["data"]["MT_WEIGHTS_SOURCE"] == "a/b; echo x"  # env, never a shell word


def test_fetcher_links_the_quant_match(tmp_path: Path) -> None:
    """The init container's script, run here on a local directory of GGUF files."""
    from hpc.k8s.fetch_weights import fetch

    src = tmp_path / "src"
    src.mkdir()
    for name in ("m-Q8_0.gguf", "m-q4_k_m.gguf", "README.md"):
        (src / name).write_text(name)
    link = fetch(tmp_path / "weights", "llamacpp", str(src), "Q4_K_M", None)
    assert link == tmp_path / "weights" / "model.gguf"
    assert link.read_text() == "m-q4_k_m.gguf"
    fetch(tmp_path / "weights", "llamacpp", str(src), "Q8_0", None)  # relinked in place
    assert link.read_text() == "m-Q8_0.gguf"


def test_an_engine_route_is_refused_with_the_reason() -> None:
    """A Route straight to an engine would bypass the gateway's keys, limits and timeouts."""
    spec = ModelSpec.model_validate(
        {**CASES["llamacpp_cpu"], "kubernetes": {"route": True, "route_host": "x.example.org"}}
    )
    with pytest.raises(MTError) as info:
        model_objects(spec, names_for(spec, namespace="llm"), api_key=KEY)
    assert "per-job key" in info.value.message
    assert "kubernetes.gateway.expose" in (info.value.hint or "")


def test_gpu_type_becomes_the_sites_node_label() -> None:
    (dep,) = [o for o in objects("vllm_two_gpus_a100") if o["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "topology.kubernetes.io/zone": "zone-a",
    }
    # A type the site does not map is used as the label's value as it is.
    spec = ModelSpec.model_validate(
        {**CASES["vllm_two_gpus_a100"], "resources": {"gpus": 1, "gpu_type": "NVIDIA-H100"}}
    )
    (dep,) = [
        o
        for o in model_objects(spec, names_for(spec, namespace="llm"), api_key=KEY, site=SITE)
        if o["kind"] == "Deployment"
    ]
    assert (
        dep["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100"
    )


def test_gpu_type_without_a_site_label_is_refused() -> None:
    spec = ModelSpec.model_validate(CASES["vllm_two_gpus_a100"])
    with pytest.raises(MTError) as info:
        model_objects(spec, names_for(spec, namespace="llm"), api_key=KEY)
    assert "a100" in info.value.message
    assert "kubernetes.gpu_type_label" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("resources", "kubernetes", "image"),
    [
        ({}, {}, "ghcr.io/ggml-org/llama.cpp:server"),
        ({"gpus": 1}, {}, "ghcr.io/ggml-org/llama.cpp:server-cuda"),
        ({"gpus": 1}, {"gpu_resource": "amd.com/gpu"}, "ghcr.io/ggml-org/llama.cpp:server-rocm"),
        ({"gpus": 1}, {"image": "registry.example.org/llama:1"}, "registry.example.org/llama:1"),
    ],
)
def test_the_llamacpp_image_follows_the_accelerator(
    resources: dict[str, Any], kubernetes: dict[str, Any], image: str
) -> None:
    spec = ModelSpec.model_validate(
        {**CASES["llamacpp_cpu"], "resources": resources, "kubernetes": kubernetes}
    )
    assert engine_image(spec) == image


def _golden_docs(name: str) -> dict[str, dict[str, Any]]:
    docs = yaml.safe_load_all((GOLDEN / name).read_text(encoding="utf-8"))
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize(
    ("kind", "path", "bad"),
    [
        # A typo in a field name (strict: unknown fields fail, as for built-in kinds).
        ("ServiceMonitor", ("spec", "endpoints", 0), {"bearerTokenSecrett": {}}),
        ("ServiceMonitor", ("spec", "endpoints", 0), {"scheme": "gopher"}),
        ("PrometheusRule", ("spec", "groups", 0, "rules", 0), {"for": "ten minutes"}),
        ("Route", ("spec", "tls"), {"termination": "tunnel"}),
        ("Route", ("spec",), {"hosts": ["llm.example.org"]}),
    ],
)
def test_the_crd_schemas_reject_what_their_api_server_would(
    kind: str, path: tuple[Any, ...], bad: dict[str, Any]
) -> None:
    """The shipped CRD schemas (tests/schemas/) check the kinds kubernetes-validate does not."""
    obj = _golden_docs("gateway_openshift.yaml")[kind]
    validate(obj)  # as rendered: accepted
    node: Any = obj
    for step in path:
        node = node[step]
    node.update(bad)
    with pytest.raises(AssertionError):
        validate(obj)


def test_a_crd_kind_without_a_shipped_schema_fails() -> None:
    monitor = _golden_docs("gateway_openshift.yaml")["ServiceMonitor"]
    with pytest.raises(AssertionError, match=r"no schema for monitoring\.coreos\.com/v1 Probe"):
        validate({**monitor, "kind": "Probe"})


def test_a_multi_node_model_is_refused_not_squeezed_into_one_pod() -> None:
    spec = ModelSpec.model_validate(
        {
            "name": "big",
            "engine": "vllm",
            "weights": {"source": "org/big"},
            "resources": {"gpus": 8, "nodes": 2},
        }
    )
    with pytest.raises(MTError) as refused:
        model_objects(spec, names_for(spec, namespace="ns", nonce=NONCE), api_key=KEY)
    assert "resources.nodes=2" in refused.value.message
    assert "--backend slurm" in (refused.value.hint or "")
