"""A swap pool on Kubernetes, as plain dicts (pure; golden-tested).

The same ``pools:`` entry as under Slurm: one Deployment whose container runs the pool
process (``python -m hpc.job.swappool``, hpc.job.slots) with its catalogue, loading the
models on request into its slots. An init container per catalogue model fetches that
model's weights into the pool's PVC (``/models/<model>/weights``, the layout a model's own
PVC has); the plan in the pool's ConfigMap names those paths, so the pool's engines read
them from the volume and run in the pod's image (``kubernetes.image``: modeltainer plus the
engines' servers), never through Apptainer.

What the pool serves, like the engines on Kubernetes: plain HTTP on the pod's port behind
a NetworkPolicy that admits only the gateway (and Prometheus, which scrapes the pool's
``/metrics``), every route but ``/health`` behind the per-job key, which comes from the
pool's Secret by ``secretKeyRef``. No registry record is written in the pod: the
Deployment's status is the job's state (hpc.backends.kubernetes). The gateway's models.yaml
routes every catalogue name to the pool's Service (hpc.k8s.gateway); a gateway that finds
engines from the API reads the catalogue from the Service's ``modeltainer.io/serves``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from hpc.errors import MTError
from hpc.job.plan import STOP_MARGIN_S, ClusterServe, PoolPlan
from hpc.k8s.manifests import (
    FETCH_COMMAND,
    PROBE_PERIOD_S,
    container_security,
    fetcher_text,
    hf_token_ref,
    http_probe,
    node_selector,
    place,
    pod_security,
    pvc,
    resources_for,
    secret,
    service,
)
from hpc.k8s.naming import (
    ENGINE_CONTAINER,
    INSTANCE_LABEL,
    KEY_ENTRY,
    MANAGED_BY,
    SERVES_ANNOTATION,
    Manifest,
    Names,
    labels_for,
    meta_for,
    slug,
)
from hpc.k8s.settings import KubernetesSite
from hpc.spec import ModelSpec, PoolSpec, Runtime

KEY_ENV = "MT_POOL_KEY"
PLAN_ENTRY = "plan.json"
CONFIG_DIR = "/etc/modeltainer"
MODELS_ROOT = "/models"
# The pod's grace covers the pool's drain, its engines' stop and the record-less exit.
MIN_GRACE_S = 60


def weights_dir(spec: ModelSpec) -> str:
    """Where ``spec``'s weights live on the pool's volume (a model's own PVC: the same)."""
    return f"{MODELS_ROOT}/{slug(spec.name)}/weights"


def pod_catalogue(catalogue: Sequence[ModelSpec]) -> tuple[ModelSpec, ...]:
    """The catalogue as the pod runs it: weights from the volume, no Apptainer (the pod's
    image is the runtime), the pod's own network (the engines listen on Unix sockets)."""
    out = []
    for spec in catalogue:
        link = "model.gguf" if spec.engine == "llamacpp" else "model"
        weights = spec.weights.model_copy(
            update={"source": f"{weights_dir(spec)}/{link}", "quant": None, "revision": None}
        )
        update = {"weights": weights, "runtime": Runtime(), "engine_network": "shared"}
        out.append(spec.model_copy(update=update))
    return tuple(out)


def pool_plan(
    pool: PoolSpec, catalogue: Sequence[ModelSpec], names: Names, nonce: str | None
) -> PoolPlan:
    """The plan the pod's pool reads from its ConfigMap (no secret in it)."""
    return PoolPlan(
        pool=pool.model_copy(update={"runtime": None}),
        catalogue=pod_catalogue(catalogue),
        backend="kubernetes",
        job_id=names.instance,
        nonce=nonce or "layout",
        drain_s=pool.drain_s,
        cluster=ClusterServe(port=pool.kubernetes.port, key_env=KEY_ENV),
    )


def termination_grace_s(plan: PoolPlan) -> int:
    """Long enough to drain, stop the engines and exit; never under ``MIN_GRACE_S``."""
    need = plan.drain_s + plan.stop_grace_s + STOP_MARGIN_S
    return max(MIN_GRACE_S, math.ceil(need) + 10)


def _image(pool: PoolSpec) -> str:
    if pool.kubernetes.image is None:
        raise MTError(
            f"{pool.name}: a swap pool's pod runs the pool process and its engines in one "
            "image, and the pool names none",
            hint="set kubernetes.image of the pool to an image with modeltainer and the "
            "engines' servers (llama-server, vllm) on its PATH (docs/kubernetes.md)",
        )
    return pool.kubernetes.image


def configmap(pool: PoolSpec, names: Names, plan: PoolPlan, nonce: str | None) -> Manifest:
    """The pool's plan and the weight fetcher."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta_for(names.configmap, names, labels_for(pool, names, nonce), pool),
        "data": {
            PLAN_ENTRY: plan.model_dump_json(indent=2) + "\n",
            "fetch_weights.py": fetcher_text(),
        },
    }


def _fetch(spec: ModelSpec, index: int, env: list[Manifest]) -> Manifest:
    """An init container putting ``spec``'s weights under :func:`weights_dir`."""
    settings = {
        "MT_MODEL": spec.name,
        "MT_ENGINE": spec.engine,
        "MT_WEIGHTS_SOURCE": spec.weights.source,
        "MT_WEIGHTS_QUANT": spec.weights.quant or "",
        "MT_WEIGHTS_REVISION": spec.weights.revision or "",
        "MT_WEIGHTS_DIR": weights_dir(spec),
    }
    return {
        "name": f"fetch-{index}-{slug(spec.name, 50)}",
        "image": spec.kubernetes.fetch_image,
        "command": list(FETCH_COMMAND),
        "env": [
            *({"name": k, "value": v} for k, v in settings.items()),
            *env,
            {"name": "HF_TOKEN", "valueFrom": hf_token_ref()},
        ],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "weights", "mountPath": MODELS_ROOT},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, private to the pod
            {"name": "cache", "mountPath": "/cache"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }


def deployment(
    pool: PoolSpec,
    catalogue: Sequence[ModelSpec],
    names: Names,
    plan: PoolPlan,
    nonce: str | None,
    site: KubernetesSite,
) -> Manifest:
    """The pool's pod: fetch every catalogue model's weights, then run the pool on them."""
    k8s = pool.kubernetes
    labels = labels_for(pool, names, nonce)
    selector = {INSTANCE_LABEL: names.instance, "app.kubernetes.io/managed-by": MANAGED_BY}
    env = [
        {"name": "HOME", "value": "/tmp"},  # noqa: S108
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
    ]
    # The pool listens at once; a model loads on request, under its own startup_timeout_s
    # inside the pool, while /health keeps answering: no probe waits for a load. The startup
    # budget is still the slowest model's, so a slow first start is never killed as a hang.
    slowest_s = max(spec.startup_timeout_s for spec in catalogue)
    startup_failures = max(6, math.ceil(slowest_s / PROBE_PERIOD_S))
    key_ref = {"secretKeyRef": {"name": names.secret, "key": KEY_ENTRY}}
    container_env = [*env, {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if pool.resources.gpus:
        # The device plugin shows the pod only its own GPUs, numbered from 0, and sets no
        # *_VISIBLE_DEVICES the pool could split between its slots (hpc.job.slots): name them.
        visible = (
            "ROCR_VISIBLE_DEVICES"
            if k8s.gpu_resource == "amd.com/gpu"
            else ("CUDA_VISIBLE_DEVICES")
        )
        devices = ",".join(str(i) for i in range(pool.resources.gpus))
        container_env.append({"name": visible, "value": devices})
    container: Manifest = {
        "name": ENGINE_CONTAINER,
        "image": _image(pool),
        "command": ["python", "-m", "hpc.job.swappool", "--plan", f"{CONFIG_DIR}/{PLAN_ENTRY}"],
        "env": [*container_env, {"name": KEY_ENV, "valueFrom": key_ref}],
        "ports": [{"name": "http", "containerPort": k8s.port, "protocol": "TCP"}],
        "resources": resources_for(pool),
        "startupProbe": http_probe("/health", "http", PROBE_PERIOD_S, startup_failures, 5),
        "readinessProbe": http_probe("/health", "http", PROBE_PERIOD_S, 3, 5),
        "livenessProbe": http_probe("/health", "http", 20, 3, 10),
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "weights", "mountPath": MODELS_ROOT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - the slots' 0700 socket dirs
            {"name": "cache", "mountPath": "/cache"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "shm", "mountPath": "/dev/shm"},  # noqa: S108 - vLLM needs shm
        ],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": termination_grace_s(plan),
        "securityContext": pod_security(k8s.run_as_user),
        "initContainers": [_fetch(spec, i, env) for i, spec in enumerate(catalogue)],
        "containers": [container],
        "volumes": [
            {"name": "weights", "persistentVolumeClaim": {"claimName": names.pvc}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {"name": "config", "configMap": {"name": names.configmap}},
        ],
    }
    place(pod, pool, node_selector(pool, site))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta_for(names.instance, names, labels, pool),
        "spec": {
            "replicas": 1,
            # One GPU set and one RWO volume: the old pod goes before the new one starts.
            "strategy": {"type": "Recreate"},
            "progressDeadlineSeconds": int(slowest_s) + 600,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def pool_service(pool: PoolSpec, names: Names, nonce: str | None) -> Manifest:
    """The pool's Service, annotated with its catalogue: a gateway that finds engines from the
    API (gateway.k8sdiscovery) routes each of those names to the pool, as the registry's
    record's ``serves`` does."""
    svc = service(pool, names, nonce)
    svc["metadata"]["annotations"][SERVES_ANNOTATION] = json.dumps(list(pool.models))
    return svc


def pool_objects(
    pool: PoolSpec,
    catalogue: Sequence[ModelSpec],
    names: Names,
    *,
    api_key: str,
    nonce: str | None = None,
    site: KubernetesSite | None = None,
) -> list[Manifest]:
    """The pool's own objects, in the order they are created (dependencies first)."""
    if not catalogue:
        raise MTError(
            f"{pool.name}: none of the pool's models is in models.yaml",
            hint="list models of the same file under the pool's models:",
        )
    if pool.kubernetes.route or pool.kubernetes.route_host:
        raise MTError(
            f"{pool.name}: kubernetes.route would expose the pool itself, past the gateway",
            hint="remove kubernetes.route/route_host from the pool; the gateway's Route or "
            "Ingress is in front of every model",
        )
    plan = pool_plan(pool, catalogue, names, nonce)
    objects = [
        secret(pool, names, api_key, nonce),
        configmap(pool, names, plan, nonce),
    ]
    if pool.kubernetes.pvc is None:
        objects.append(pvc(pool, names))
    objects += [
        deployment(pool, catalogue, names, plan, nonce, site or KubernetesSite()),
        pool_service(pool, names, nonce),
    ]
    return objects
