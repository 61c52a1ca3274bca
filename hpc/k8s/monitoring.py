"""Prometheus-operator objects (pure; golden-tested): what is scraped, what alerts, and
the Grafana dashboard.

ServiceMonitors scrape the gateway's ``/metrics`` (with a token whose hash is in the
gateway's keys.yaml and which may call no model) and each engine's (with that engine's
key: llama-server guards ``/metrics`` with it). The alert rules use the names the gateway
really exports (``gateway/metrics.py``; a test parses both) and kube-state-metrics' for
what only the cluster knows: replicas available, pods pending. The dashboard is
``docs/grafana/mt-gateway.json`` (shipped in this package by a link), in a ConfigMap with
the label Grafana's dashboard sidecar looks for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from importlib import resources

from hpc.k8s.gateway import (
    GATEWAY_LABELS,
    GATEWAY_NAME,
    GATEWAY_SECRET,
    GATEWAY_SELECTOR,
    METRICS_TOKEN_ENTRY,
)
from hpc.k8s.naming import (
    INSTANCE_LABEL,
    KEY_ENTRY,
    MANAGED_BY,
    Manifest,
    Names,
    Served,
    labels_for,
    meta_for,
)
from hpc.k8s.settings import KubernetesSite
from hpc.spec import ModelSpec

DASHBOARD_FILE = "mt-gateway.json"
DASHBOARD_CONFIGMAP = "mt-grafana-dashboard"
RULES_NAME = "mt-alerts"
_SCRAPE_INTERVAL = "30s"
# kube-state-metrics writes a resource name with its dots and slash as underscores.
_GPU_RESOURCES = "nvidia_com_gpu|amd_com_gpu"


def _endpoint(secret: str, key: str) -> Manifest:
    return {
        "port": "http",
        "path": "/metrics",
        "interval": _SCRAPE_INTERVAL,
        "authorization": {"type": "Bearer", "credentials": {"name": secret, "key": key}},
    }


def gateway_monitor(namespace: str) -> Manifest:
    """Scrape every gateway replica with the metrics-only token."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": GATEWAY_NAME, "namespace": namespace, "labels": dict(GATEWAY_LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(GATEWAY_SELECTOR)},
            "endpoints": [_endpoint(GATEWAY_SECRET, METRICS_TOKEN_ENTRY)],
        },
    }


def engine_monitor(spec: Served, names: Names, nonce: str | None = None) -> Manifest:
    """Scrape one engine's own metrics (vLLM's ``vllm:*``, llama-server's ``llamacpp:*``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta_for(names.instance, names, labels_for(spec, names, nonce), spec),
        "spec": {
            "selector": {
                "matchLabels": {
                    INSTANCE_LABEL: names.instance,
                    "app.kubernetes.io/managed-by": MANAGED_BY,
                }
            },
            "endpoints": [_endpoint(names.secret, KEY_ENTRY)],
        },
    }


def _minutes(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds / 60))}m"


def _model_rules(spec: Served, names: Names) -> list[Manifest]:
    # A pool listens before any model loads; its pod waits only for the weights' fetch.
    startup_s = spec.startup_timeout_s if isinstance(spec, ModelSpec) else 0.0
    selector = f'namespace="{names.namespace}",deployment="{names.instance}"'
    return [
        {
            "alert": "MTModelNoReadyReplica",
            "expr": f"max(kube_deployment_status_replicas_available{{{selector}}}) < 1",
            # A model may load for its whole start-up budget before a replica is ready.
            "for": _minutes(max(300.0, startup_s)),
            "labels": {"severity": "critical", "model": spec.name},
            "annotations": {
                "summary": f"{spec.name}: no ready replica",
                "description": f"Deployment {names.instance} has had no available replica "
                "for longer than its start-up budget: requests for the model fail. "
                f"`kubectl describe deployment -n {names.namespace} {names.instance}`.",
            },
        }
    ]


def rules(
    namespace: str, site: KubernetesSite, engines: Sequence[tuple[Served, Names]]
) -> Manifest:
    """The alerts an operator needs, for the gateway and every engine of the layout."""
    mon = site.monitoring
    gateway_sel = f'namespace="{namespace}",deployment="{GATEWAY_NAME}"'
    requests = "mt_gateway_requests_total"
    ttft = "mt_gateway_time_to_first_token_seconds_bucket"
    gateway_rules: list[Manifest] = [
        {
            "alert": "MTGatewayNoReadyReplica",
            "expr": f"max(kube_deployment_status_replicas_available{{{gateway_sel}}}) < 1",
            "for": "2m",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "the ModelTainer gateway has no ready replica",
                "description": "Every request fails. "
                f"`kubectl get pods -n {namespace} -l app.kubernetes.io/name={GATEWAY_NAME}`.",
            },
        },
        {
            "alert": "MTModelErrorRatio",
            "expr": f'sum by (model) (rate({requests}{{namespace="{namespace}",status=~"5.."}}'
            f'[5m])) / sum by (model) (rate({requests}{{namespace="{namespace}"}}[5m])) '
            f"> {mon.error_ratio:g}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.model }}: more than "
                f"{mon.error_ratio:.0%} of requests fail with 5xx",
                "description": "The gateway answers 5xx for {{ $labels.model }}: its engines "
                "fail or are unreachable. See the gateway's log and `mt status`.",
            },
        },
        {
            "alert": "MTModelSlowFirstToken",
            "expr": f"histogram_quantile(0.95, sum by (model, le) (rate({ttft}"
            f'{{namespace="{namespace}"}}[5m]))) > {mon.ttft_p95_s:g}',
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.model }}: p95 time to first token above "
                f"{mon.ttft_p95_s:g} s",
                "description": "Requests queue at the engines: add replicas or GPUs, or "
                "lower max_tokens/context.",
            },
        },
    ]
    engine_rules = [rule for spec, names in engines for rule in _model_rules(spec, names)]
    pending = (
        f'sum by (namespace, pod) (kube_pod_status_phase{{namespace="{namespace}",'
        'phase="Pending"}) > 0 and on (namespace, pod) sum by (namespace, pod) '
        f'(kube_pod_container_resource_requests{{namespace="{namespace}",'
        f'resource=~"{_GPU_RESOURCES}"}}) > 0'
    )
    engine_rules.append(
        {
            "alert": "MTGPUPodPending",
            "expr": pending,
            "for": f"{mon.gpu_pending_min}m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": "{{ $labels.pod }} waits for a GPU node",
                "description": "A pod asking for GPUs has been Pending for "
                f"{mon.gpu_pending_min} minutes: no node has free GPUs of that kind, the "
                "label its affinity asks for, or room in the quota. "
                f"`kubectl describe pod -n {namespace} {{{{ $labels.pod }}}}`.",
            },
        }
    )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": RULES_NAME, "namespace": namespace, "labels": dict(GATEWAY_LABELS)},
        "spec": {
            "groups": [
                {"name": "modeltainer-gateway", "rules": gateway_rules},
                {"name": "modeltainer-engines", "rules": engine_rules},
            ]
        },
    }


def dashboard_configmap(namespace: str) -> Manifest:
    """The gateway's Grafana dashboard, labelled for Grafana's dashboard sidecar."""
    text = resources.files("hpc.k8s").joinpath(DASHBOARD_FILE).read_text("utf-8")
    labels = {**GATEWAY_LABELS, "grafana_dashboard": "1"}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": DASHBOARD_CONFIGMAP, "namespace": namespace, "labels": labels},
        "data": {DASHBOARD_FILE: text},
    }


def monitoring_objects(
    namespace: str, site: KubernetesSite, engines: Sequence[tuple[Served, Names]]
) -> list[Manifest]:
    """The gateway's ServiceMonitor, the alert rules and the dashboard ([] when disabled)."""
    if not site.monitoring.enabled:
        return []
    return [
        gateway_monitor(namespace),
        rules(namespace, site, engines),
        dashboard_configmap(namespace),
    ]
