"""Kubernetes objects for one model spec, as plain dicts (pure; golden-tested).

One model is a Secret (the per-job key), a ConfigMap (engine settings and the weight
fetcher), a PersistentVolumeClaim (the weights, kept between runs), a Deployment (an init
container that fetches the weights, then the engine) and a ClusterIP Service. No Route or
Ingress ever points at an engine: the gateway's (hpc.k8s.gateway) is the way in. The key
reaches the engine by ``secretKeyRef`` in its environment, never by argv. Every object
carries ``app.kubernetes.io/managed-by: modeltainer``, which is how ``status`` lists them all
in one call per namespace.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

from hpc.errors import MTError
from hpc.k8s.naming import (
    ENGINE_CONTAINER,
    INSTANCE_LABEL,
    KEY_ENTRY,
    MANAGED_BY,
    Manifest,
    Names,
    Served,
    labels_for,
    meta_for,
    slug,
)
from hpc.k8s.settings import KubernetesSite
from hpc.llamacppserver import check_engine_args
from hpc.spec import ModelSpec

WEIGHTS_ROOT = "/models/weights"

# The engines' own server images, used unless kubernetes.image says otherwise; llama.cpp's
# follows the accelerator (a CUDA image on an AMD node or a CPU-only one does not start).
DEFAULT_IMAGES = {
    "vllm": "docker.io/vllm/vllm-openai:v0.11.0",
    "llamacpp": "ghcr.io/ggml-org/llama.cpp:server-cuda",
}
_LLAMACPP_IMAGES = {
    "nvidia.com/gpu": "ghcr.io/ggml-org/llama.cpp:server-cuda",
    "amd.com/gpu": "ghcr.io/ggml-org/llama.cpp:server-rocm",
    "cpu": "ghcr.io/ggml-org/llama.cpp:server",
}
_COMMANDS = {"vllm": ["vllm", "serve"], "llamacpp": ["/app/llama-server"]}
_KEY_ENV = {"vllm": "VLLM_API_KEY", "llamacpp": "LLAMA_API_KEY"}

# The init container's command: the fetcher needs a Python 3 and nothing else (it speaks the
# Hub's HTTP API with the standard library), so nothing is installed when the pod starts.
FETCH_COMMAND = ["python3", "/etc/modeltainer/fetch_weights.py"]
PROBE_PERIOD_S = 10


def _has_flag(args: tuple[str, ...], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def engine_image(spec: ModelSpec) -> str:
    """``kubernetes.image``, else the engine's server image for the model's accelerator."""
    if spec.kubernetes.image:
        return spec.kubernetes.image
    if spec.engine == "llamacpp":
        accelerator = spec.kubernetes.gpu_resource if spec.resources.gpus else "cpu"
        return _LLAMACPP_IMAGES[accelerator]
    return DEFAULT_IMAGES[spec.engine]


def engine_args(spec: ModelSpec) -> list[str]:
    """The engine's argv after its command: the weights link, the port, the served name."""
    port = str(spec.kubernetes.port)
    gpus = spec.resources.gpus
    if spec.engine == "llamacpp":
        check_engine_args(spec, None)  # the image's llama-server: llama-cpp-python's flags fail
        args = ["--model", f"{WEIGHTS_ROOT}/model.gguf", "--host", "0.0.0.0", "--port", port]  # noqa: S104 - the Service is the way in; the key guards it
        args += ["--alias", spec.name]
        if not _has_flag(spec.engine_args, "--metrics"):
            args.append("--metrics")  # Prometheus text on /metrics (behind the key)
        if gpus and not _has_flag(spec.engine_args, "-ngl", "--n-gpu-layers"):
            args += ["--n-gpu-layers", "999"]
    else:
        args = [f"{WEIGHTS_ROOT}/model", "--host", "0.0.0.0", "--port", port]  # noqa: S104
        args += ["--served-model-name", spec.name]
        if gpus > 1 and not _has_flag(spec.engine_args, "--tensor-parallel-size", "-tp"):
            args += ["--tensor-parallel-size", str(gpus)]
    return [*args, *spec.engine_args]


def secret(spec: Served, names: Names, api_key: str, nonce: str | None = None) -> Manifest:
    """The per-job key; only the engine (by env) and the registry know it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta_for(names.secret, names, labels_for(spec, names, nonce), spec),
        "type": "Opaque",
        "stringData": {KEY_ENTRY: api_key},
    }


def fetcher_text() -> str:
    """hpc/k8s/fetch_weights.py, which the init containers run from a ConfigMap."""
    return resources.files("hpc.k8s").joinpath("fetch_weights.py").read_text("utf-8")


def configmap(spec: ModelSpec, names: Names, nonce: str | None = None) -> Manifest:
    """Engine settings (read by the init container by env) and the fetcher script."""
    fetcher = fetcher_text()
    data = {
        "MT_MODEL": spec.name,
        "MT_ENGINE": spec.engine,
        "MT_WEIGHTS_SOURCE": spec.weights.source,
        "MT_WEIGHTS_QUANT": spec.weights.quant or "",
        "MT_WEIGHTS_REVISION": spec.weights.revision or "",
        "MT_WEIGHTS_DIR": WEIGHTS_ROOT,
        "fetch_weights.py": fetcher,
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta_for(names.configmap, names, labels_for(spec, names, nonce), spec),
        "data": data,
    }


def pvc(spec: Served, names: Names) -> Manifest:
    """The weights volume, per model (no nonce): a new job of the model reuses its files."""
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": f"{spec.kubernetes.storage_gb}Gi"}},
    }
    if spec.kubernetes.storage_class:
        claim["storageClassName"] = spec.kubernetes.storage_class
    labels = labels_for(spec, names, None)
    labels[INSTANCE_LABEL] = names.pvc
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta_for(names.pvc, names, labels, spec),
        "spec": claim,
    }


def affinity_for(spec: Served) -> dict[str, Any] | None:
    """A required node affinity to ``role_label=role`` (None without a role)."""
    k8s = spec.kubernetes
    if not k8s.role:
        return None
    term = {"matchExpressions": [{"key": k8s.role_label, "operator": "In", "values": [k8s.role]}]}
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }


def resources_for(spec: Served) -> dict[str, Any]:
    """CPU and memory requests, the memory limit, and the GPUs as a limit."""
    res = spec.resources
    mem = f"{math.ceil(res.mem_gb * 1024)}Mi"
    limits: dict[str, Any] = {"memory": mem}
    if res.gpus:
        limits[spec.kubernetes.gpu_resource] = str(res.gpus)
    return {"requests": {"cpu": str(res.cpus), "memory": mem}, "limits": limits}


def container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security(run_as_user: int | None) -> dict[str, Any]:
    """Every mt pod's security context: non-root, the runtime's seccomp profile, and the
    site's uid (also owning the volumes) when it names one."""
    security: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    if run_as_user is not None:
        security |= {"runAsUser": run_as_user, "fsGroup": run_as_user}
    return security


def http_probe(
    path: str, port: str, period_s: int, failures: int, timeout_s: int
) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "failureThreshold": failures,
        "timeoutSeconds": timeout_s,
    }


def node_selector(spec: Served, site: KubernetesSite) -> dict[str, str]:
    """``kubernetes.node_selector`` plus the site's GPU-model label for ``gpu_type``."""
    selector = dict(spec.kubernetes.node_selector)
    gpu_type = spec.resources.gpu_type
    if gpu_type and spec.resources.gpus:
        if site.gpu_type_label is None:
            raise MTError(
                f"{spec.name} asks for gpu_type {gpu_type}, and the site names no node label "
                "for GPU models, so Kubernetes could put it on any GPU",
                hint="set kubernetes.gpu_type_label (e.g. nvidia.com/gpu.product) and "
                f"kubernetes.gpu_types ({{{gpu_type}: <that label's value>}}) in site.yaml, "
                "or drop resources.gpu_type",
            )
        selector[site.gpu_type_label] = site.gpu_types.get(gpu_type, gpu_type)
    return dict(sorted(selector.items()))


def place(pod: dict[str, Any], spec: Served, nodes: dict[str, str]) -> None:
    """Put ``pod`` where ``spec`` asks: on ``nodes`` (:func:`node_selector`), with its
    affinity, and, with GPUs, tolerating the GPU nodes' taint."""
    if nodes:
        pod["nodeSelector"] = nodes
    affinity = affinity_for(spec)
    if affinity:
        pod["affinity"] = affinity
    if spec.resources.gpus:
        # GPU nodes are usually tainted with their resource name; only GPU pods tolerate it.
        pod["tolerations"] = [
            {"key": spec.kubernetes.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}
        ]


def deployment(
    spec: ModelSpec,
    names: Names,
    nonce: str | None = None,
    site: KubernetesSite | None = None,
) -> Manifest:
    """The model's pod: fetch the weights into the PVC, then serve them with the engine."""
    k8s = spec.kubernetes
    selector_of_nodes = node_selector(spec, site or KubernetesSite())
    labels = labels_for(spec, names, nonce)
    selector = {INSTANCE_LABEL: names.instance, "app.kubernetes.io/managed-by": MANAGED_BY}
    # Model load counts against the startup probe only; liveness starts after it passes, so
    # a slow load is never killed as a hang, and a hung engine is still restarted later.
    startup_failures = max(1, math.ceil(spec.startup_timeout_s / PROBE_PERIOD_S))
    key_ref = {"secretKeyRef": {"name": names.secret, "key": KEY_ENTRY}}
    mounts = [
        {"name": "weights", "mountPath": "/models", "subPath": slug(spec.name)},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, private to the pod
        {"name": "cache", "mountPath": "/cache"},
    ]
    env = [
        {"name": "HOME", "value": "/tmp"},  # noqa: S108
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
    ]
    engine: dict[str, Any] = {
        "name": ENGINE_CONTAINER,
        "image": engine_image(spec),
        "command": list(_COMMANDS[spec.engine]),
        "args": engine_args(spec),
        "env": [*env, {"name": _KEY_ENV[spec.engine], "valueFrom": key_ref}],
        "ports": [{"name": "http", "containerPort": k8s.port, "protocol": "TCP"}],
        "resources": resources_for(spec),
        "startupProbe": http_probe("/health", "http", PROBE_PERIOD_S, startup_failures, 5),
        "readinessProbe": http_probe("/health", "http", PROBE_PERIOD_S, 3, 5),
        "livenessProbe": http_probe("/health", "http", 20, 3, 10),
        "securityContext": container_security(),
        "volumeMounts": [*mounts, {"name": "shm", "mountPath": "/dev/shm"}],  # noqa: S108 - vLLM needs shm
    }
    fetch: dict[str, Any] = {
        "name": "fetch-weights",
        "image": k8s.fetch_image,
        "command": list(FETCH_COMMAND),
        "envFrom": [{"configMapRef": {"name": names.configmap}}],
        "env": [*env, {"name": "HF_TOKEN", "valueFrom": hf_token_ref()}],
        "resources": {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"memory": "2Gi"},
        },
        "securityContext": container_security(),
        "volumeMounts": [
            *mounts,
            {"name": "fetcher", "mountPath": "/etc/modeltainer", "readOnly": True},
        ],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 90,  # in-flight requests finish; vLLM frees GPUs
        "securityContext": pod_security(k8s.run_as_user),
        "initContainers": [fetch],
        "containers": [engine],
        "volumes": [
            {"name": "weights", "persistentVolumeClaim": {"claimName": names.pvc}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {
                "name": "fetcher",
                "configMap": {
                    "name": names.configmap,
                    "items": [{"key": "fetch_weights.py", "path": "fetch_weights.py"}],
                },
            },
        ],
    }
    place(pod, spec, selector_of_nodes)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta_for(names.instance, names, labels, spec),
        "spec": {
            "replicas": 1,
            # One GPU set and one RWO volume: the old pod goes before the new one starts.
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": int(spec.startup_timeout_s) + 600,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def hf_token_ref() -> dict[str, Any]:
    """The fetcher's HF_TOKEN, from the Secret ``hf-token`` if there is one."""
    # Optional: gated repos need a token; a Secret `hf-token` provides it if it exists.
    return {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}}


def service(spec: Served, names: Names, nonce: str | None = None) -> Manifest:
    """A ClusterIP Service: ``<instance>.<namespace>.svc:<port>`` is the registry's endpoint."""
    port = spec.kubernetes.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta_for(names.instance, names, labels_for(spec, names, nonce), spec),
        "spec": {
            "type": "ClusterIP",
            "selector": {
                INSTANCE_LABEL: names.instance,
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def base_url(spec: Served, names: Names) -> str:
    """The engine's OpenAI root through the Service, as the registry records it."""
    return f"http://{names.service_host}:{spec.kubernetes.port}/v1"


def refuse_engine_route(spec: ModelSpec) -> None:
    """A Route to an engine is refused: the gateway's Route/Ingress is the way in."""
    if spec.kubernetes.route or spec.kubernetes.route_host:
        raise MTError(
            f"{spec.name}: kubernetes.route would expose the engine itself, which answers "
            "only with its per-job key and has none of the gateway's client keys, limits "
            "or streaming timeouts",
            hint="remove kubernetes.route/route_host from the model; the gateway's Route or "
            "Ingress (site.yaml kubernetes.gateway.expose and host) is in front of every model",
        )


def model_objects(
    spec: ModelSpec,
    names: Names,
    *,
    api_key: str,
    nonce: str | None = None,
    site: KubernetesSite | None = None,
) -> list[Manifest]:
    """The engine's own objects, in the order they are created (dependencies first)."""
    refuse_engine_route(spec)
    if spec.resources.nodes > 1:  # one Deployment, one pod: never the GPUs of N nodes in one
        raise MTError(
            f"{spec.name}: resources.nodes={spec.resources.nodes}: on Kubernetes a model runs "
            "in one pod, on one node",
            hint="set resources.nodes: 1 (and the GPUs one node has), or submit it with "
            "--backend slurm, which starts vLLM over every node of the job",
        )
    objects = [secret(spec, names, api_key, nonce), configmap(spec, names, nonce)]
    if spec.kubernetes.pvc is None:  # an existing PVC is the user's, never ours to create
        objects.append(pvc(spec, names))
    objects += [deployment(spec, names, nonce, site), service(spec, names, nonce)]
    return objects
