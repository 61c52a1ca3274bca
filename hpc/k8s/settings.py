"""The site's ``kubernetes:`` block: the gateway in front of the engines, who may reach it,
what Prometheus watches, and how a ``gpu_type`` becomes a node label.

A model's own ``kubernetes:`` block (hpc.spec.KubernetesOptions) says where its engine
runs; this block holds what a site sets once for all of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hpc.spec import K8sLabelKey, K8sLabelValue, K8sName


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewayK8s(_Strict):
    """The gateway's Deployment, Service and the Route/Ingress in front of it."""

    replicas: int = Field(default=2, ge=1, le=100, description="`mt render --gateway-replicas`")
    image: str = Field(
        default="modeltainer-gateway:0.1.0",
        pattern=r"^[^\s]+$",
        description="built from recipes/compose/Dockerfile.gateway and pushed where the "
        "cluster pulls from",
    )
    port: int = Field(default=8081, gt=0, lt=65536)
    cpu: str = Field(default="500m", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="request")
    mem_mi: int = Field(default=512, gt=0, description="request and limit, MiB")
    run_as_user: int | None = Field(
        default=10001, ge=1, description="the image's user; null on OpenShift (SCC picks it)"
    )
    expose: Literal["route", "ingress", "none"] = Field(
        default="ingress", description="OpenShift Route, Ingress (nginx-ingress), or none"
    )
    host: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    ingress_class: K8sName | None = None
    tls_secret: K8sName | None = Field(
        default=None, description="Ingress: the Secret with the host's certificate"
    )
    stream_timeout_s: int = Field(
        default=3600,
        gt=0,
        description="how long the router/ingress keeps a quiet connection (long generations)",
    )
    ingress_namespace: K8sName | None = Field(
        default=None,
        description="where the router/ingress controller runs (default: OpenShift's ingress "
        "policy group for a Route, ingress-nginx for an Ingress)",
    )
    client_namespaces: tuple[K8sName, ...] = Field(
        default=(),
        description="namespaces whose pods may call the gateway directly (LibreChat, LlamaStack)",
    )
    apply_on_submit: bool = Field(
        default=True,
        description="`mt submit --backend kubernetes` creates the gateway's objects when absent",
    )
    discover: bool = Field(
        default=False,
        description="`mt render`: the gateway also finds engines from the Kubernetes API "
        "(jobs submitted later; a ServiceAccount and a read-only Role are rendered); the "
        "gateway `mt submit` applies always does",
    )
    discover_interval_s: float | None = Field(
        default=None,
        gt=0,
        description="with discovery, how often the gateway asks the API (`mt gateway "
        "--discover-interval`; default: the gateway's own, 10 s); raise it on a big cluster",
    )


class MonitoringK8s(_Strict):
    """ServiceMonitors, PrometheusRules and the Grafana dashboard (prometheus-operator)."""

    enabled: bool = Field(default=True, description="needs the prometheus-operator CRDs")
    prometheus_namespace: K8sName = Field(
        default="monitoring", description="where Prometheus runs (allowed to scrape engines)"
    )
    error_ratio: float = Field(default=0.05, gt=0, lt=1, description="5xx share that alerts")
    ttft_p95_s: float = Field(default=10, gt=0, description="time to first token that alerts")
    gpu_pending_min: int = Field(default=15, gt=0, description="a GPU pod pending this long")


class KubernetesSite(_Strict):
    """Everything a site sets once for the Kubernetes objects of all its models."""

    gateway: GatewayK8s = Field(default_factory=GatewayK8s)
    monitoring: MonitoringK8s = Field(default_factory=MonitoringK8s)
    gpu_type_label: K8sLabelKey | None = Field(
        default=None,
        description="the node label that names a node's GPU model (e.g. nvidia.com/gpu.product)",
    )
    gpu_types: dict[str, K8sLabelValue] = Field(
        default_factory=dict,
        description="resources.gpu_type → that label's value (default: gpu_type itself)",
    )
