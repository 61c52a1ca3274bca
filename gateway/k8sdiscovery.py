"""Engines found from the Kubernetes API: ``mt gateway --discover kubernetes[:NAMESPACE]``.

The namespace's mt-managed Services (``app.kubernetes.io/managed-by=modeltainer``) name
their model in the ``modeltainer.io/model`` annotation; each ready endpoint of their
EndpointSlices (``kubernetes.io/service-name``) becomes one ``ready`` record, with the key
from the instance's Secret ``<instance>-key`` (entry ``api-key``). A swap pool's Service
also lists its catalogue (``modeltainer.io/serves``, hpc.k8s.pool): its records serve every
name of it, as a submitted pool's registry record does. The records are merged
into the route table with the registry's (:func:`gateway.routes.build_routes`), so a job
submitted after the gateway started is routed at the next reload, and a cancelled one
(its Service deleted) disappears. A failed API call raises ``KubernetesError``: the
reloader keeps the last good records and logs a warning. The reloader asks the API every
``discover_interval_s`` (gateway.config), not at every reload: a list of Services, then one
of EndpointSlices and one Secret read per Service, is work for a big cluster's API server.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from hpc.errors import MTError
from hpc.k8s.apiclient import KubeApi
from hpc.k8s.naming import (
    INSTANCE_LABEL,
    KEY_ENTRY,
    MANAGED_SELECTOR,
    MODEL_ANNOTATION,
    POOL_COMPONENT,
    SERVES_ANNOTATION,
)
from hpc.registry import Record

BACKEND = "k8s"
SCHEME = "kubernetes"
_SLICE_LABEL = "kubernetes.io/service-name"


def parse_discover(value: str) -> str | None:
    """``kubernetes`` → None (the kubeconfig's or pod's namespace), ``kubernetes:NS`` → NS."""
    scheme, _, namespace = value.partition(":")
    if scheme != SCHEME or (namespace == "" and ":" in value):
        raise MTError(
            f"unknown discovery source {value!r}",
            hint="--discover kubernetes (this namespace) or --discover kubernetes:NAMESPACE",
        )
    return namespace or None


@dataclass
class KubeDiscovery:
    """Lists the engines of one namespace through :class:`hpc.k8s.apiclient.KubeApi`."""

    namespace: str | None = None
    api: KubeApi = field(default_factory=KubeApi)

    def records(self) -> list[Record]:
        """One ``ready`` record per ready endpoint of every mt-managed Service."""
        namespace = self.namespace or self.api.default_namespace()
        core = self.api.apis()[0]
        services = self._items(
            "list services",
            namespace,
            core.list_namespaced_service,
            namespace,
            label_selector=MANAGED_SELECTOR,
        )
        records: list[Record] = []
        for service in services:
            meta = service.get("metadata") or {}
            model = (meta.get("annotations") or {}).get(MODEL_ANNOTATION)
            instance = (meta.get("labels") or {}).get(INSTANCE_LABEL)
            if not model or not instance:
                continue
            addresses = self._ready(namespace, meta["name"])
            if not addresses:
                continue
            key = self._key(namespace, f"{instance}-key")
            if key is None:
                continue
            component = (meta.get("labels") or {}).get("app.kubernetes.io/component", "")
            serves = _serves(meta.get("annotations") or {})
            # A pool's records are named as the registry names a submitted pool's (hpc.jobs).
            engine = "pool" if component == POOL_COMPONENT else component or "unknown"
            for i, (address, port) in enumerate(addresses):
                records.append(
                    Record(
                        backend=BACKEND,
                        job_id=f"{namespace}.{instance}.{i}",
                        nonce=instance,
                        model=model,
                        engine=engine,
                        state="ready",
                        node=address,
                        port=port,
                        base_url=f"http://{_host(address)}:{port}/v1",
                        api_key=key,
                        serves=serves,
                        created_at=0,
                    )
                )
        return records

    def _ready(self, namespace: str, service: str) -> list[tuple[str, int]]:
        """The (address, port) of each ready endpoint of ``service``'s EndpointSlices."""
        from kubernetes import client

        discovery = client.DiscoveryV1Api(self.api.client())
        slices = self._items(
            f"list endpointslices of {service}",
            namespace,
            discovery.list_namespaced_endpoint_slice,
            namespace,
            label_selector=f"{_SLICE_LABEL}={service}",
        )
        found: list[tuple[str, int]] = []
        for item in slices:
            ports = [p.get("port") for p in item.get("ports") or [] if p.get("name") == "http"]
            if not ports or not isinstance(ports[0], int):
                continue
            for endpoint in item.get("endpoints") or []:
                # Kubernetes: an unknown readiness (no condition) counts as ready.
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                found += [(addr, ports[0]) for addr in endpoint.get("addresses") or []]
        return sorted(set(found))

    def _key(self, namespace: str, name: str) -> str | None:
        core = self.api.apis()[0]
        resp = self.api.call(
            f"get Secret {name}", namespace, core.read_namespaced_secret, name, namespace
        )
        data = (json.loads(resp.data).get("data") or {}).get(KEY_ENTRY)
        if not data:
            return None
        try:
            return base64.b64decode(data).decode("utf-8").strip() or None
        except (binascii.Error, UnicodeDecodeError):
            return None

    def _items(
        self, action: str, namespace: str, fn: Any, *args: Any, **kw: Any
    ) -> list[dict[str, Any]]:
        resp = self.api.call(action, namespace, fn, *args, **kw)
        return [dict(item) for item in json.loads(resp.data).get("items") or []]


def _serves(annotations: dict[str, str]) -> tuple[str, ...]:
    """A pool's catalogue from its Service's annotation; () for an engine (or a bad value,
    which leaves the pool routed under its own name only)."""
    raw = annotations.get(SERVES_ANNOTATION)
    if not raw:
        return ()
    try:
        names = json.loads(raw)
    except ValueError:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return ()
    return tuple(names)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
