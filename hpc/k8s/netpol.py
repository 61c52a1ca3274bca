"""NetworkPolicies (pure; golden-tested): engines hear only the gateway, the gateway only
its router and the namespaces a site names.

An engine's pods accept connections on their port from the gateway's pods (and from
Prometheus' namespace, which scrapes ``/metrics`` there); nothing else in the cluster
reaches them, even with a stolen key. The gateway's pods accept them from the namespace of
the OpenShift router or the ingress controller, from the site's client namespaces
(LibreChat, LlamaStack: ``kubernetes.gateway.client_namespaces``) and from Prometheus.
Namespaces are matched by ``kubernetes.io/metadata.name``, the label Kubernetes itself
sets on every namespace.
"""

from __future__ import annotations

from hpc.k8s.gateway import GATEWAY_LABELS, GATEWAY_NAME, GATEWAY_SELECTOR
from hpc.k8s.naming import INSTANCE_LABEL, MANAGED_BY, Manifest, Names, Served, labels_for, meta_for
from hpc.k8s.settings import KubernetesSite

NAMESPACE_LABEL = "kubernetes.io/metadata.name"
# OpenShift puts its router's namespace in this policy group (the documented way to allow it).
OPENSHIFT_INGRESS_GROUP = {"policy-group.network.openshift.io/ingress": ""}
DEFAULT_INGRESS_NAMESPACE = "ingress-nginx"


def _namespace(name: str) -> Manifest:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: name}}}


def _http_rule(peers: list[Manifest]) -> Manifest:
    return {"from": peers, "ports": [{"protocol": "TCP", "port": "http"}]}


def _prometheus(site: KubernetesSite) -> list[Manifest]:
    if not site.monitoring.enabled:
        return []
    return [_http_rule([_namespace(site.monitoring.prometheus_namespace)])]


def engine_policy(
    spec: Served,
    names: Names,
    *,
    gateway_namespace: str,
    site: KubernetesSite,
    nonce: str | None = None,
) -> Manifest:
    """The engine's pods accept only the gateway's pods (and Prometheus) on their port."""
    gateway = {
        **_namespace(gateway_namespace),
        "podSelector": {"matchLabels": dict(GATEWAY_SELECTOR)},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta_for(names.instance, names, labels_for(spec, names, nonce), spec),
        "spec": {
            "podSelector": {
                "matchLabels": {
                    INSTANCE_LABEL: names.instance,
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                }
            },
            "policyTypes": ["Ingress"],
            "ingress": [_http_rule([gateway]), *_prometheus(site)],
        },
    }


def ingress_peer(site: KubernetesSite) -> Manifest | None:
    """Where the Route's router or the Ingress controller connects from (None: not exposed)."""
    gw = site.gateway
    if gw.expose == "none":
        return None
    if gw.ingress_namespace:
        return _namespace(gw.ingress_namespace)
    if gw.expose == "route":
        return {"namespaceSelector": {"matchLabels": dict(OPENSHIFT_INGRESS_GROUP)}}
    return _namespace(DEFAULT_INGRESS_NAMESPACE)


def gateway_policy(namespace: str, site: KubernetesSite) -> Manifest:
    """The gateway's pods accept the router/ingress, the client namespaces and Prometheus."""
    peers = [_namespace(name) for name in site.gateway.client_namespaces]
    router = ingress_peer(site)
    if router is not None:
        peers.insert(0, router)
    rules = [_http_rule(peers)] if peers else []
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": GATEWAY_NAME, "namespace": namespace, "labels": dict(GATEWAY_LABELS)},
        "spec": {
            "podSelector": {"matchLabels": dict(GATEWAY_SELECTOR)},
            "policyTypes": ["Ingress"],
            "ingress": [*rules, *_prometheus(site)],
        },
    }
