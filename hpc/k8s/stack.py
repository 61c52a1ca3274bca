"""Everything one deployment of models needs, grouped the way it is applied (pure).

A model's group is its engine (hpc.k8s.manifests), the NetworkPolicy that lets only the
gateway in, and the ServiceMonitor of its metrics; a swap pool's is its Deployment
(hpc.k8s.pool), the same NetworkPolicy and a ServiceMonitor of the pool's metrics. The
gateway's group is the gateway (hpc.k8s.gateway) and its NetworkPolicy; the monitoring of
the whole layout (hpc.k8s.monitoring) goes beside it. Both ``mt render``
(hpc.k8s.kustomize) and ``mt submit`` (hpc.backends.kubernetes) build their objects here,
so what is committed and what is applied are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

from hpc.k8s.gateway import gateway_objects
from hpc.k8s.manifests import model_objects
from hpc.k8s.monitoring import engine_monitor
from hpc.k8s.naming import Manifest, Names, Served
from hpc.k8s.netpol import engine_policy, gateway_policy
from hpc.k8s.pool import pool_objects
from hpc.k8s.settings import KubernetesSite
from hpc.spec import ModelSpec, PoolSpec


def model_group(
    spec: ModelSpec,
    names: Names,
    *,
    api_key: str,
    site: KubernetesSite,
    gateway_namespace: str,
    nonce: str | None = None,
) -> list[Manifest]:
    """One model's objects: its engine, the policy that admits only the gateway, its monitor."""
    objects = model_objects(spec, names, api_key=api_key, nonce=nonce, site=site)
    return objects + _guards(spec, names, site, gateway_namespace, nonce)


def _guards(
    served: Served, names: Names, site: KubernetesSite, gateway_namespace: str, nonce: str | None
) -> list[Manifest]:
    """What every engine or pool gets beside its own objects: the policy that admits only the
    gateway (and Prometheus), and, with monitoring, its ServiceMonitor."""
    guards = [
        engine_policy(served, names, gateway_namespace=gateway_namespace, site=site, nonce=nonce)
    ]
    if site.monitoring.enabled:
        guards.append(engine_monitor(served, names, nonce))
    return guards


def pool_group(
    pool: PoolSpec,
    catalogue: Sequence[ModelSpec],
    names: Names,
    *,
    api_key: str,
    site: KubernetesSite,
    gateway_namespace: str,
    nonce: str | None = None,
) -> list[Manifest]:
    """A swap pool's objects (hpc.k8s.pool), the policy that admits only the gateway, and
    the monitor of the pool's own ``/metrics`` (hpc.job.poolmetrics), as for an engine."""
    objects = pool_objects(pool, catalogue, names, api_key=api_key, nonce=nonce, site=site)
    return objects + _guards(pool, names, site, gateway_namespace, nonce)


def gateway_group(
    namespace: str,
    site: KubernetesSite,
    engines: Sequence[tuple[Served, Names]],
    *,
    client_keys: str,
    metrics_token: str,
    discover: bool = False,
) -> list[Manifest]:
    """The gateway's objects and its NetworkPolicy (the monitoring is apart:
    hpc.k8s.monitoring.monitoring_objects); ``discover``: it finds engines from the API."""
    objects = gateway_objects(
        namespace,
        site,
        engines,
        client_keys=client_keys,
        metrics_token=metrics_token,
        discover=discover,
    )
    objects.append(gateway_policy(namespace, site))
    return objects
