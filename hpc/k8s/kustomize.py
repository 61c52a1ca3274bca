"""Kustomize directories from model specs: one YAML file per object plus kustomization.yaml.

Pure: every function returns ``{relative path: text}``; only :func:`write_tree` touches the
filesystem. The result is what people commit and ``kubectl apply -k``: ``gateway/`` (the
one way in), ``monitoring/`` (alerts and dashboard) and one directory per model and per
swap pool. A
``secret.yaml`` holds a key, so each such directory's ``.gitignore`` keeps it out of git.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hpc.errors import MTError
from hpc.k8s.monitoring import monitoring_objects
from hpc.k8s.naming import Manifest, Served, names_for, slug
from hpc.k8s.settings import KubernetesSite
from hpc.k8s.stack import gateway_group, model_group, pool_group
from hpc.spec import ModelSpec, PoolSpec

_FILE_NAMES = {
    "Secret": "secret.yaml",
    "ConfigMap": "configmap.yaml",
    "PersistentVolumeClaim": "pvc.yaml",
    "Deployment": "deployment.yaml",
    "Service": "service.yaml",
    "Route": "route.yaml",
    "Ingress": "ingress.yaml",
    "PodDisruptionBudget": "pdb.yaml",
    "NetworkPolicy": "networkpolicy.yaml",
    "ServiceMonitor": "servicemonitor.yaml",
    "PrometheusRule": "prometheusrule.yaml",
    "ServiceAccount": "serviceaccount.yaml",
    "Role": "role.yaml",
    "RoleBinding": "rolebinding.yaml",
}


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (the fetcher script) as readable ``|`` blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        """No ``&id001`` anchors: shared env entries are written out in each container."""
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    """One object as YAML, keys in the order the manifest functions wrote them."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _directory(objects: Sequence[Manifest], *, secret_note: str) -> dict[str, str]:
    """One file per object plus kustomization.yaml (and a .gitignore when a Secret is in)."""
    files = {_FILE_NAMES[obj["kind"]]: to_yaml(obj) for obj in objects}
    if len(files) != len(objects):  # two objects of a kind would overwrite each other
        raise ValueError(f"two objects of one kind in {[o['kind'] for o in objects]}")
    kustomization: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    files["kustomization.yaml"] = to_yaml(kustomization)
    if "secret.yaml" in files:
        files[".gitignore"] = f"# {secret_note}: never commit it\nsecret.yaml\n"
    return files


def layout_namespace(specs: Sequence[Served], namespace: str | None) -> str:
    """The layout's one namespace: ``namespace``, else the models' own, else ``default``."""
    if namespace:
        return namespace
    chosen = {spec.kubernetes.namespace or "default" for spec in specs}
    if len(chosen) > 1:
        raise MTError(
            f"the models are in several namespaces ({', '.join(sorted(chosen))}), and the "
            "gateway in front of them reads their keys from their Secrets, in its own namespace",
            hint="give every model the same kubernetes.namespace",
        )
    return chosen.pop()


def layout_tree(
    specs: Sequence[ModelSpec],
    *,
    api_keys: Mapping[str, str],
    client_keys: str,
    metrics_token: str,
    site: KubernetesSite,
    namespace: str | None = None,
    pools: Sequence[tuple[PoolSpec, Sequence[ModelSpec]]] = (),
) -> dict[str, str]:
    """The gateway, the monitoring and one directory per model and per swap pool (with its
    catalogue), under a top kustomization.

    ``api_keys`` has a key per model and pool name; ``client_keys`` is the gateway's
    keys.yaml (key hashes); ``metrics_token`` the key Prometheus scrapes with (its hash is
    added to keys.yaml).
    """
    served: list[Served] = [*specs, *(pool for pool, _ in pools)]
    dirs = [slug(spec.name) for spec in served]
    if len(set(dirs)) != len(dirs) or {"gateway", "monitoring"} & set(dirs):
        raise MTError(
            "two models or pools map to the same directory name (or to gateway/ or monitoring/)",
            hint="give the models and pools distinct names",
        )
    ns = layout_namespace(served, namespace)
    engines = [(spec, names_for(spec, namespace=ns)) for spec in served]
    groups: dict[str, tuple[list[Manifest], str]] = {
        "gateway": (
            gateway_group(
                ns,
                site,
                engines,
                client_keys=client_keys,
                metrics_token=metrics_token,
                discover=site.gateway.discover,
            ),
            "the gateway's metrics token and client key hashes",
        )
    }
    monitoring = monitoring_objects(ns, site, engines)
    if monitoring:
        groups["monitoring"] = (monitoring, "")
    catalogues = {pool.name: catalogue for pool, catalogue in pools}
    for directory, (spec, names) in zip(dirs, engines, strict=True):
        key = api_keys[spec.name]
        if isinstance(spec, PoolSpec):
            objects = pool_group(
                spec, catalogues[spec.name], names, api_key=key, site=site, gateway_namespace=ns
            )
            groups[directory] = (objects, "the pool's API key")
        else:
            objects = model_group(spec, names, api_key=key, site=site, gateway_namespace=ns)
            groups[directory] = (objects, "the model's API key")
    files: dict[str, str] = {}
    for directory, (objects, note) in groups.items():
        tree = _directory(objects, secret_note=note)
        files |= {f"{directory}/{path}": text for path, text in tree.items()}
    top: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(groups),
    }
    files["kustomization.yaml"] = to_yaml(top)
    return dict(sorted(files.items()))


def write_tree(directory: Path, files: Mapping[str, str]) -> list[Path]:
    """Write ``files`` under ``directory`` (created); secret.yaml files are 0600."""
    written = []
    for rel, text in files.items():
        path = directory / rel
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if not rel.endswith("secret.yaml"):
                path.chmod(0o644)
        except OSError as exc:
            raise MTError(
                f"cannot write {path}: {exc.strerror}", hint="choose another --output directory"
            ) from exc
        written.append(path)
    return written
