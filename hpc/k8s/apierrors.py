"""Kubernetes API errors as KubernetesError with a hint: the one place that sees ApiException."""

from __future__ import annotations

import json

from hpc.errors import BackendError


class KubernetesError(BackendError):
    """The Kubernetes API refused or failed a call; ``status`` is its HTTP status (or None)."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


def _api_message(body: object) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            data = json.loads(body)
        except ValueError:
            return body.strip()
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])
        return body.strip()
    return ""


def api_error(exc: Exception, *, action: str, namespace: str) -> KubernetesError:
    """A Kubernetes client exception as a KubernetesError with a hint (the one boundary)."""
    from kubernetes.client.exceptions import ApiException

    if not isinstance(exc, ApiException):  # urllib3: the API server did not answer
        return KubernetesError(
            f"cannot reach the Kubernetes API server to {action}: {exc}",
            hint="check the cluster address in your kubeconfig (`kubectl cluster-info`)",
        )
    status = int(exc.status or 0)
    detail = _api_message(exc.body) or str(exc.reason or "")
    where = f"in namespace {namespace}"
    if status == 401:
        hint = "your kubeconfig's credentials were refused: log in again (`oc login`, `kubectl`)"
        return KubernetesError(f"cannot {action}: unauthorized", status=status, hint=hint)
    if status == 403 and "exceeded quota" in detail:
        return KubernetesError(
            f"cannot {action} {where}: quota exceeded: {detail}",
            status=status,
            hint=f"`kubectl describe resourcequota -n {namespace}` shows what is left; ask for "
            "fewer GPUs, CPUs or memory in resources:, or for a larger quota",
        )
    if status == 403:
        return KubernetesError(
            f"cannot {action} {where}: forbidden: {detail}",
            status=status,
            hint="your account needs a Role there that allows deployments, services, secrets, "
            "configmaps, persistentvolumeclaims, pods and pods/log "
            f"(`kubectl auth can-i create deployments -n {namespace}`)",
        )
    if status == 404 and "namespace" in detail.lower():
        return KubernetesError(
            f"cannot {action}: {detail}",
            status=status,
            hint="set kubernetes.namespace in models.yaml to a namespace you can use",
        )
    if status == 422:
        return KubernetesError(
            f"the API server rejected the manifests ({action}): {detail}",
            status=status,
            hint="`mt submit --dry-run --backend kubernetes MODEL` shows what was sent",
        )
    return KubernetesError(f"cannot {action} {where}: HTTP {status}: {detail}", status=status)


def unschedulable_hint(spec_role: tuple[str, str] | None, message: str) -> str:
    """Why a pod waits for a node, and what to do about it."""
    if "affinity" in message or "selector" in message:
        if spec_role:
            label, role = spec_role
            return (
                f"no node matches {label}={role}: label a GPU node "
                f"(`kubectl label node NODE {label}={role}`) or change kubernetes.role"
            )
        return "no node matches kubernetes.node_selector: check the node labels"
    if "Insufficient" in message:
        return "no node has enough free GPUs, CPUs or memory: wait, or ask for less"
    return "`kubectl describe pod` shows the scheduler's events"
