"""The gateway on Kubernetes, as plain dicts (pure; golden-tested): the one way in.

``mt-gateway`` is a Deployment of N replicas (rolling update, a PodDisruptionBudget,
anti-affinity across nodes, read-only root, non-root, probes on ``/healthz``), its Service,
and in front of it an OpenShift Route or an Ingress with timeouts long enough for a
streamed generation. Its models.yaml (a ConfigMap) lists each engine's Service as a
``static:`` backend; each engine's key reaches it by ``secretKeyRef`` in its environment.
Its client keys come from a Secret: an init container copies ``keys.yaml`` into the pod's
private home with mode 0600, since ``mt gateway`` refuses a keys file another user owns or
can read (a Secret volume's files belong to root).

With discovery on (always for the gateway ``mt submit`` applies, whose jobs come later;
``kubernetes.gateway.discover`` for a rendered layout) it also runs ``--discover
kubernetes:<namespace>`` (gateway.k8sdiscovery) as its own ServiceAccount, bound by a Role
to get/list/watch Services, EndpointSlices and Secrets of its namespace only; only then is
the account's token mounted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import yaml

from hpc.errors import MTError
from hpc.k8s.manifests import base_url, container_security, http_probe, pod_security
from hpc.k8s.naming import KEY_ENTRY, MANAGED_BY, Manifest, Names, Served, slug
from hpc.k8s.settings import KubernetesSite
from hpc.spec import PoolSpec

GATEWAY_NAME = "mt-gateway"
GATEWAY_SECRET = "mt-gateway-keys"  # noqa: S105 - a name
GATEWAY_CONFIGMAP = "mt-gateway-models"
KEYS_ENTRY = "keys.yaml"
METRICS_TOKEN_ENTRY = "metrics-token"  # noqa: S105 - a name
SCRAPE_CLIENT = "prometheus-scrape"
# What selects the gateway's pods (and only them): engines' NetworkPolicies allow these.
GATEWAY_SELECTOR = {
    "app.kubernetes.io/name": GATEWAY_NAME,
    "app.kubernetes.io/managed-by": MANAGED_BY,
}
GATEWAY_LABELS = {
    **GATEWAY_SELECTOR,
    "app.kubernetes.io/instance": GATEWAY_NAME,
    "app.kubernetes.io/component": "gateway",
}
_READ = ["get", "list", "watch"]
_HOME = "/var/lib/mt"
_MT_HOME = f"{_HOME}/home"  # made 0700 by the init container; mt refuses a wider one
_SECRET_DIR = "/etc/mt/secret"  # noqa: S105 - a path
_MODELS_DIR = "/etc/mt/models"
# Fixed text: copies the client keys where only the gateway's user can read them.
_COPY_KEYS = (
    f'install -d -m 0700 "$MT_HOME" && install -m 0600 {_SECRET_DIR}/{KEYS_ENTRY} '
    f'"$MT_HOME/{KEYS_ENTRY}"'
)


def _meta(name: str, namespace: str, annotations: dict[str, str] | None = None) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace, "labels": dict(GATEWAY_LABELS)}
    if annotations:
        meta["annotations"] = annotations
    return meta


def key_env(spec: Served) -> str:
    """The gateway's environment variable holding ``spec``'s engine key."""
    return "MT_ENGINE_KEY_" + slug(spec.name).upper().replace("-", "_")


def keys_yaml(client_keys: str, metrics_token: str) -> str:
    """The user's keys.yaml plus a client for Prometheus that may read /metrics only.

    Its ``models: []`` allows no model; its hash, never the token, goes into keys.yaml.
    """
    try:
        data = yaml.safe_load(client_keys) or {}
    except yaml.YAMLError as exc:
        raise MTError(
            f"the gateway's keys.yaml is not YAML: {exc}", hint="mt keys create NAME rewrites it"
        ) from exc
    entries = list(data.get("keys") or []) if isinstance(data, dict) else None
    if entries is None or not all(isinstance(e, dict) for e in entries):
        raise MTError(
            "the gateway's keys.yaml holds no `keys:` list", hint="mt keys create NAME makes one"
        )
    if any(e.get("name") == SCRAPE_CLIENT for e in entries):
        raise MTError(
            f"keys.yaml already has a client called {SCRAPE_CLIENT}, the name the rendered "
            "gateway gives Prometheus",
            hint=f"rename that client in keys.yaml (the render adds its own {SCRAPE_CLIENT})",
        )
    digest = hashlib.sha256(metrics_token.encode("utf-8")).hexdigest()
    entries.append({"name": SCRAPE_CLIENT, "sha256": digest, "models": []})
    return yaml.safe_dump({"keys": entries}, sort_keys=False)


def secret(namespace: str, client_keys: str, metrics_token: str) -> Manifest:
    """Client key hashes (keys.yaml) and the token Prometheus scrapes ``/metrics`` with."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(GATEWAY_SECRET, namespace),
        "type": "Opaque",
        "stringData": {
            KEYS_ENTRY: keys_yaml(client_keys, metrics_token),
            METRICS_TOKEN_ENTRY: metrics_token,
        },
    }


def models_configmap(namespace: str, engines: Sequence[tuple[Served, Names]]) -> Manifest:
    """models.yaml for the gateway: every engine's Service as a ``static:`` backend; a swap
    pool's Service under each name of its catalogue (the pool loads the model asked for)."""
    static = [
        {"name": name, "base_url": base_url(spec, names), "api_key_env": key_env(spec)}
        for spec, names in engines
        for name in (spec.models if isinstance(spec, PoolSpec) else (spec.name,))
    ]
    text = "# rendered by `mt render --backend kubernetes`: the engines behind this gateway\n"
    text += yaml.safe_dump({"static": static}, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(GATEWAY_CONFIGMAP, namespace),
        "data": {"models.yaml": text},
    }


def service_account(namespace: str) -> Manifest:
    """The gateway's own identity, for discovery: nothing else runs as it."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "automountServiceAccountToken": False,  # the gateway's pod asks for it, no other
    }


def role(namespace: str) -> Manifest:
    """Read-only, this namespace only: the engines' Services, their EndpointSlices and the
    Secrets with their keys."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "rules": [
            {"apiGroups": [""], "resources": ["services", "secrets"], "verbs": _READ},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": _READ},
        ],
    }


def role_binding(namespace: str) -> Manifest:
    """The Role, granted to the gateway's ServiceAccount."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": GATEWAY_NAME},
        "subjects": [{"kind": "ServiceAccount", "name": GATEWAY_NAME, "namespace": namespace}],
    }


def deployment(
    namespace: str,
    site: KubernetesSite,
    engines: Sequence[tuple[Served, Names]],
    *,
    discover: bool = False,
) -> Manifest:
    """N replicas that roll one at a time, spread over nodes, each a hardened ``mt gateway``."""
    gw = site.gateway
    port = str(gw.port)
    mem = f"{gw.mem_mi}Mi"
    home_env = [{"name": "MT_HOME", "value": _MT_HOME}, {"name": "HOME", "value": _HOME}]
    engine_keys = [
        {
            "name": key_env(spec),
            "valueFrom": {"secretKeyRef": {"name": names.secret, "key": KEY_ENTRY}},
        }
        for spec, names in engines
    ]
    command = ["mt", "--models", f"{_MODELS_DIR}/models.yaml", "gateway"]
    command += ["--host", "0.0.0.0", "--port", port, "--keys", f"{_MT_HOME}/{KEYS_ENTRY}"]  # noqa: S104 - the pod's address; keys and NetworkPolicies guard it
    if discover:
        command += ["--discover", f"kubernetes:{namespace}"]
        if gw.discover_interval_s is not None:
            command += ["--discover-interval", f"{gw.discover_interval_s:g}"]
    container: Manifest = {
        "name": "gateway",
        "image": gw.image,
        "command": command,
        "env": [*home_env, {"name": "PYTHONUNBUFFERED", "value": "1"}, *engine_keys],
        "ports": [{"name": "http", "containerPort": gw.port, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": gw.cpu, "memory": mem}, "limits": {"memory": mem}},
        "readinessProbe": http_probe("/healthz", "http", 5, 3, 3),
        "livenessProbe": http_probe("/healthz", "http", 10, 6, 5),
        # The router keeps sending to an old pod for a moment after it is told to stop.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "home", "mountPath": _HOME},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - an emptyDir, private to the pod
            {"name": "models", "mountPath": _MODELS_DIR, "readOnly": True},
        ],
    }
    copy_keys: Manifest = {
        "name": "copy-keys",
        "image": gw.image,
        "command": ["sh", "-c", _COPY_KEYS],
        "env": home_env,
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": container_security(),
        "volumeMounts": [
            {"name": "home", "mountPath": _HOME},
            {"name": "keys", "mountPath": _SECRET_DIR, "readOnly": True},
        ],
    }
    anti_affinity = {
        "podAntiAffinity": {
            # Preferred, not required: three replicas on two nodes still all run.
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": dict(GATEWAY_SELECTOR)},
                    },
                }
            ]
        }
    }
    keys_volume = {
        "secretName": GATEWAY_SECRET,
        "defaultMode": 0o440,  # the pod's group (fsGroup) reads it; copied 0600 at start
        "items": [{"key": KEYS_ENTRY, "path": KEYS_ENTRY}],
    }
    account: Manifest = (
        {"serviceAccountName": GATEWAY_NAME, "automountServiceAccountToken": True}
        if discover
        else {"automountServiceAccountToken": False}
    )
    pod: Manifest = {
        **account,
        "terminationGracePeriodSeconds": 60,  # streams in flight finish (mt gateway drains)
        "securityContext": pod_security(gw.run_as_user),
        "affinity": anti_affinity,
        "initContainers": [copy_keys],
        "containers": [container],
        "volumes": [
            {"name": "home", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "keys", "secret": keys_volume},
            {"name": "models", "configMap": {"name": GATEWAY_CONFIGMAP}},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "spec": {
            "replicas": gw.replicas,
            # A new pod is ready before an old one goes: the gateway never has fewer replicas.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "selector": {"matchLabels": dict(GATEWAY_SELECTOR)},
            "template": {"metadata": {"labels": dict(GATEWAY_LABELS)}, "spec": pod},
        },
    }


def service(namespace: str, site: KubernetesSite) -> Manifest:
    """The gateway's ClusterIP Service, what the Route/Ingress and in-cluster clients use."""
    port = site.gateway.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(GATEWAY_SELECTOR),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(namespace: str) -> Manifest:
    """A node drain takes one gateway replica at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(GATEWAY_NAME, namespace),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(GATEWAY_SELECTOR)}},
    }


def route(namespace: str, site: KubernetesSite) -> Manifest:
    """OpenShift: edge TLS to the gateway; the router's 30 s default would cut generations."""
    gw = site.gateway
    annotations = {"haproxy.router.openshift.io/timeout": f"{gw.stream_timeout_s}s"}
    body: Manifest = {
        "to": {"kind": "Service", "name": GATEWAY_NAME, "weight": 100},
        "port": {"targetPort": "http"},
        "tls": {"termination": "edge", "insecureEdgeTerminationPolicy": "Redirect"},
    }
    if gw.host:
        body["host"] = gw.host
    return {
        "apiVersion": "route.openshift.io/v1",
        "kind": "Route",
        "metadata": _meta(GATEWAY_NAME, namespace, annotations),
        "spec": body,
    }


def ingress(namespace: str, site: KubernetesSite) -> Manifest:
    """An Ingress to the gateway; nginx-ingress neither buffers nor times out a stream."""
    gw = site.gateway
    timeout = str(gw.stream_timeout_s)
    annotations = {
        "nginx.ingress.kubernetes.io/proxy-buffering": "off",
        "nginx.ingress.kubernetes.io/proxy-read-timeout": timeout,
        "nginx.ingress.kubernetes.io/proxy-send-timeout": timeout,
        "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
    }
    backend = {"service": {"name": GATEWAY_NAME, "port": {"name": "http"}}}
    rule: Manifest = {"http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}
    if gw.host:
        rule = {"host": gw.host, **rule}
    body: Manifest = {}
    if gw.ingress_class:
        body["ingressClassName"] = gw.ingress_class
    if gw.tls_secret:
        tls: Manifest = {"secretName": gw.tls_secret}
        if gw.host:
            tls = {"hosts": [gw.host], **tls}
        body["tls"] = [tls]
    body["rules"] = [rule]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _meta(GATEWAY_NAME, namespace, annotations),
        "spec": body,
    }


def gateway_objects(
    namespace: str,
    site: KubernetesSite,
    engines: Sequence[tuple[Served, Names]],
    *,
    client_keys: str,
    metrics_token: str,
    discover: bool = False,
) -> list[Manifest]:
    """The gateway's objects, dependencies first; engines must share its namespace.

    ``discover``: it also finds engines from the API (its ServiceAccount, Role, binding)."""
    for spec, names in engines:
        if names.namespace != namespace:
            raise MTError(
                f"{spec.name} is in namespace {names.namespace} and the gateway in {namespace}: "
                "the gateway reads each engine's key from its Secret, which only a pod of the "
                "same namespace can do",
                hint="give every model of the layout the same kubernetes.namespace",
            )
    rbac = [service_account(namespace), role(namespace), role_binding(namespace)]
    objects = [
        secret(namespace, client_keys, metrics_token),
        models_configmap(namespace, engines),
        *(rbac if discover else []),
        deployment(namespace, site, engines, discover=discover),
        service(namespace, site),
        disruption_budget(namespace),
    ]
    if site.gateway.expose == "route":
        objects.append(route(namespace, site))
    elif site.gateway.expose == "ingress":
        objects.append(ingress(namespace, site))
    return objects
