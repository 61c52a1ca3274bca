"""The Kubernetes API as mt uses it: the official client configured on first use, create,
delete and list of the kinds mt makes (built-in and CRD), every error translated.

The client is imported and configured on first use: ``mt render`` and ``mt status`` of
other backends work without it. API errors are translated in
:func:`hpc.k8s.apierrors.api_error`, the one place that sees ``ApiException``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpc.k8s.apierrors import KubernetesError, api_error
from hpc.k8s.naming import Manifest

_TIMEOUT_S = 30
# Built-in kinds: (the client's API class, the noun of its namespaced methods).
_TYPED = {
    "Secret": ("CoreV1Api", "secret"),
    "ConfigMap": ("CoreV1Api", "config_map"),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim"),
    "Service": ("CoreV1Api", "service"),
    "Deployment": ("AppsV1Api", "deployment"),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy"),
    "Ingress": ("NetworkingV1Api", "ingress"),
    "PodDisruptionBudget": ("PolicyV1Api", "pod_disruption_budget"),
    "ServiceAccount": ("CoreV1Api", "service_account"),
    "Role": ("RbacAuthorizationV1Api", "role"),
    "RoleBinding": ("RbacAuthorizationV1Api", "role_binding"),
}
# Kinds a CRD adds: (group, version, plural).
_CUSTOM = {
    "Route": ("route.openshift.io", "v1", "routes"),
    "ServiceMonitor": ("monitoring.coreos.com", "v1", "servicemonitors"),
    "PrometheusRule": ("monitoring.coreos.com", "v1", "prometheusrules"),
}
_MONITORING = frozenset({"ServiceMonitor", "PrometheusRule"})
_IN_CLUSTER_NS = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeApi:
    """One cluster, through its kubeconfig (or the pod's service account)."""

    def __init__(self, kubeconfig: Path | None = None) -> None:
        self.kubeconfig = kubeconfig
        self._api: Any = None
        self._default_ns: str | None = None

    def default_namespace(self) -> str:
        """The kubeconfig context's namespace (the pod's own in a cluster), else default."""
        self.client()
        return self._default_ns or "default"

    def client(self) -> Any:
        """The configured ApiClient, made on first use from the kubeconfig or the pod."""
        if self._api is not None:
            return self._api
        try:
            from kubernetes import client, config
        except ImportError as exc:
            raise KubernetesError(
                "the kubernetes backend needs the official kubernetes client",
                hint="pip install 'modeltainer[kubernetes]'",
            ) from exc
        cfg = client.Configuration()
        # KUBECONFIG is read here, not by the client at import, so a changed one counts.
        paths = [Path(p) for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        path = self.kubeconfig or next((p for p in paths if p.is_file()), None)
        path = path or Path.home() / ".kube" / "config"
        try:
            if path.is_file():
                config.load_kube_config(config_file=str(path), client_configuration=cfg)  # type: ignore[no-untyped-call]
                _, active = config.list_kube_config_contexts(config_file=str(path))  # type: ignore[no-untyped-call]
                self._default_ns = (active.get("context") or {}).get("namespace") or "default"
            else:
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
                self._default_ns = _IN_CLUSTER_NS.read_text(encoding="utf-8").strip()
        except (config.ConfigException, OSError) as exc:
            raise KubernetesError(
                f"no usable Kubernetes configuration: {exc}",
                hint="set KUBECONFIG (or ~/.kube/config) to your cluster's kubeconfig",
            ) from exc
        self._api = client.ApiClient(cfg)
        return self._api

    def call(
        self, action: str, namespace: str, fn: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            # Raw responses: nothing here needs the client's models, and their validation
            # varies between client versions; a non-2xx answer still raises ApiException.
            return fn(*args, _request_timeout=_TIMEOUT_S, _preload_content=False, **kw)
        except (ApiException, HTTPError) as exc:
            raise api_error(exc, action=action, namespace=namespace) from exc

    def apis(self) -> tuple[Any, Any, Any]:
        from kubernetes import client

        api = self.client()
        return client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)

    def create(self, obj: Manifest, namespace: str, *, shared: bool = False) -> bool:
        """Create one object; False if it already exists and is kept: a PVC (weights are
        kept) or a ``shared`` object (the gateway's, made by an earlier job)."""
        kind = obj["kind"]
        action = f"create {kind} {obj['metadata']['name']}"
        try:
            if kind in _CUSTOM:
                group, version, plural = _CUSTOM[kind]
                custom = self.apis()[2]
                fn = custom.create_namespaced_custom_object
                self.call(action, namespace, fn, group, version, namespace, plural, obj)
            else:
                self.call(action, namespace, self.typed(kind, "create"), namespace, obj)
        except KubernetesError as exc:
            if exc.status == 409 and (shared or kind == "PersistentVolumeClaim"):
                return False
            if exc.status == 404 and kind in _MONITORING:
                raise KubernetesError(
                    f"this cluster has no {kind} resource (the prometheus-operator's CRDs)",
                    status=404,
                    hint="install the prometheus-operator (OpenShift: user workload "
                    "monitoring), or set kubernetes.monitoring.enabled: false in site.yaml",
                ) from exc
            raise
        return True

    def typed(self, kind: str, verb: str) -> Callable[..., Any]:
        """The typed client method for ``verb`` (create, delete) on a built-in ``kind``."""
        from kubernetes import client

        api = self.client()
        owner, noun = _TYPED[kind]
        return getattr(getattr(client, owner)(api), f"{verb}_namespaced_{noun}")  # type: ignore[no-any-return]

    def delete(self, kind: str, name: str, namespace: str, *, quiet: bool = False) -> None:
        action = f"delete {kind} {name}"
        try:
            if kind in _CUSTOM:
                group, version, plural = _CUSTOM[kind]
                fn = self.apis()[2].delete_namespaced_custom_object
                self.call(action, namespace, fn, group, version, namespace, plural, name)
            else:
                self.call(action, namespace, self.typed(kind, "delete"), name, namespace)
        except KubernetesError as exc:
            if exc.status == 404 or quiet:
                return
            raise

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        core, apps, _ = self.apis()
        fn = apps.list_namespaced_deployment if kind == "deployments" else core.list_namespaced_pod
        resp = self.call(
            f"list {kind}",
            namespace,
            fn,
            namespace,
            label_selector=selector,
        )
        items = json.loads(resp.data).get("items") or []
        return [dict(item) for item in items]
