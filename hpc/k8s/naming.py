"""What every Kubernetes object of mt is called and labelled (pure): names, labels, metadata.

A model's or a swap pool's instance (``mt-<name>``, ``-<nonce>`` for a submitted job), its
objects' names, and the labels every object carries (``app.kubernetes.io/managed-by:
modeltainer``: how ``status`` lists them all in one call per namespace).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hpc.spec import ModelSpec, PoolSpec

Manifest = dict[str, Any]
# What gets a Deployment and a Service of its own: a model, or a swap pool (hpc.k8s.pool).
Served = ModelSpec | PoolSpec
POOL_COMPONENT = "swap-pool"

MANAGED_BY = "modeltainer"
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MODEL_ANNOTATION = "modeltainer.io/model"
# On a swap pool's Service: its catalogue, a JSON list of names (gateway.k8sdiscovery routes
# each to the pool).
SERVES_ANNOTATION = "modeltainer.io/serves"
NONCE_LABEL = "modeltainer.io/nonce"
KEY_ENTRY = "api-key"
ENGINE_CONTAINER = "engine"


@dataclass(frozen=True)
class Names:
    """The object names of one model instance in one namespace."""

    instance: str
    namespace: str
    pvc: str

    @property
    def secret(self) -> str:
        """The Secret holding the per-job key."""
        return f"{self.instance}-key"

    @property
    def configmap(self) -> str:
        """The ConfigMap of engine settings."""
        return f"{self.instance}-config"

    @property
    def service_host(self) -> str:
        """The Service's cluster DNS name (what the registry calls the node)."""
        return f"{self.instance}.{self.namespace}.svc"


def slug(name: str, max_len: int = 40) -> str:
    """A model name as a DNS-1123 label part: ``Qwen3-Coder-30B`` → ``qwen3-coder-30b``."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return out[:max_len].strip("-") or "model"


def instance_name(spec: Served, nonce: str | None = None) -> str:
    """``mt-<model>`` for a committed layout, ``mt-<model>-<nonce>`` for a submitted job."""
    base = f"mt-{slug(spec.name)}"
    return f"{base}-{nonce}" if nonce else base


def names_for(spec: Served, *, namespace: str, nonce: str | None = None) -> Names:
    """The names of ``spec``'s objects; the PVC is per model, so weights outlive a job."""
    pvc = spec.kubernetes.pvc or f"mt-{slug(spec.name)}-weights"
    return Names(instance_name(spec, nonce), namespace, pvc)


def labels_for(spec: Served, names: Names, nonce: str | None) -> dict[str, str]:
    """The labels of every object of ``spec``'s instance (the component: its engine, or
    ``swap-pool``)."""
    component = spec.engine if isinstance(spec, ModelSpec) else POOL_COMPONENT
    labels = {
        "app.kubernetes.io/name": "model-server",
        INSTANCE_LABEL: names.instance,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }
    if nonce:
        labels[NONCE_LABEL] = nonce
    return labels


def meta_for(name: str, names: Names, labels: dict[str, str], spec: Served) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": names.namespace,
        "labels": dict(labels),
        "annotations": {MODEL_ANNOTATION: spec.name},
    }
