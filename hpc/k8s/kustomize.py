"""Kustomize directories from model specs: one YAML file per object plus kustomization.yaml.

Pure: every function returns ``{relative path: text}``; only :func:`write_tree` touches the
filesystem. The result is what people commit and ``kubectl apply -k``. ``secret.yaml``
holds the model's key, so each directory's ``.gitignore`` keeps it out of git.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hpc.errors import MTError
from hpc.k8s.manifests import Manifest, model_objects, names_for, slug
from hpc.spec import ModelSpec

_FILE_NAMES = {
    "Secret": "secret.yaml",
    "ConfigMap": "configmap.yaml",
    "PersistentVolumeClaim": "pvc.yaml",
    "Deployment": "deployment.yaml",
    "Service": "service.yaml",
    "Route": "route.yaml",
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


def model_tree(spec: ModelSpec, *, api_key: str, namespace: str | None = None) -> dict[str, str]:
    """A kustomize directory for one model: its objects, kustomization.yaml, .gitignore."""
    names = names_for(spec, namespace=namespace or spec.kubernetes.namespace or "default")
    objects = model_objects(spec, names, api_key=api_key)
    files = {_FILE_NAMES[obj["kind"]]: to_yaml(obj) for obj in objects}
    kustomization: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(files),
    }
    files["kustomization.yaml"] = to_yaml(kustomization)
    files[".gitignore"] = "# the model's API key: never commit it\nsecret.yaml\n"
    return files


def layout_tree(
    specs: Sequence[ModelSpec], *, api_keys: Mapping[str, str], namespace: str | None = None
) -> dict[str, str]:
    """Several models, one subdirectory each, and a top kustomization.yaml listing them."""
    dirs = [slug(spec.name) for spec in specs]
    if len(set(dirs)) != len(dirs):
        raise MTError(
            "two models map to the same directory name", hint="give the models distinct names"
        )
    files: dict[str, str] = {}
    for spec, directory in zip(specs, dirs, strict=True):
        tree = model_tree(spec, api_key=api_keys[spec.name], namespace=namespace)
        files |= {f"{directory}/{path}": text for path, text in tree.items()}
    top: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": dirs,
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
