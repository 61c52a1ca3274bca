"""The Kubernetes backend: a model spec becomes a Deployment and a Service (plus its Secret,
ConfigMap, PVC, NetworkPolicy and ServiceMonitor), and so does a swap pool (hpc.k8s.pool:
one Deployment running the pool process with its catalogue), through the official
``kubernetes`` client; the gateway in front of the namespace's engines (hpc.k8s.gateway) is
created with the first job and kept.

No job wrapper runs inside the pod (the engine is the container), so the transitions the
wrapper writes under Slurm come from :meth:`KubernetesBackend.status` instead, as
``JobStatus.serving``: ``ready`` when the Deployment's ``Available`` condition is true,
``starting`` while the pod runs but is not yet available. The job service
(hpc.reconcile) moves the record on from them, so whoever asks moves it.
Since the Service's DNS name resolves only inside the cluster, a gateway that routes to it
runs in the cluster (or on a machine that reaches cluster DNS).

The API itself (the client configured on first use, create/delete/list, errors
translated) is hpc.k8s.apiclient's ``KubeApi``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hpc.backends.base import Capabilities, JobHandle, JobRequest, JobStatus, Submitted
from hpc.k8s.apiclient import KubeApi
from hpc.k8s.apierrors import KubernetesError, unschedulable_hint
from hpc.k8s.clientkeys import read_client_keys
from hpc.k8s.kustomize import to_yaml
from hpc.k8s.monitoring import monitoring_objects
from hpc.k8s.naming import (
    ENGINE_CONTAINER,
    INSTANCE_LABEL,
    MANAGED_SELECTOR,
    Manifest,
    Names,
    names_for,
)
from hpc.k8s.settings import KubernetesSite
from hpc.k8s.stack import gateway_group, model_group, pool_group
from hpc.ownerkey import new_key
from hpc.registry import new_nonce
from hpc.site import Site
from hpc.spec import ModelSpec, PoolSpec


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _required_role(pod: dict[str, Any]) -> tuple[str, str] | None:
    """The (label, value) the pod's required node affinity asks for, if any."""
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            if expr.get("values"):
                return str(expr["key"]), str(expr["values"][0])
    return None


class KubernetesBackend:
    """Creates each model's objects with the official client; status lists them in bulk."""

    name = "kubernetes"
    capabilities = Capabilities(scripts=True, pools=True)

    def __init__(self, site: Site, *, kubeconfig: Path | None = None) -> None:
        self.site = site
        self.kubeconfig = kubeconfig
        self._kube = KubeApi(kubeconfig)

    def _namespace(self, spec: ModelSpec | PoolSpec) -> str:
        if spec.kubernetes.namespace:
            return spec.kubernetes.namespace
        return self._kube.default_namespace()

    # --- manifests -----------------------------------------------------------------------

    def _site(self) -> KubernetesSite:
        return self.site.config.kubernetes

    def _groups(
        self,
        spec: ModelSpec | PoolSpec,
        names: Names,
        nonce: str,
        *,
        api_key: str,
        client_keys: str | None,
        catalogue: tuple[ModelSpec, ...] = (),
    ) -> tuple[list[Manifest], list[Manifest]]:
        """The model's (or pool's) objects, and the gateway's (with the monitoring) if the
        site applies them on submit (``client_keys`` is None: it does not)."""
        site = self._site()
        ns = names.namespace
        if isinstance(spec, PoolSpec):
            model = pool_group(
                spec,
                catalogue,
                names,
                api_key=api_key,
                site=site,
                gateway_namespace=ns,
                nonce=nonce,
            )
        else:
            model = model_group(
                spec, names, api_key=api_key, site=site, gateway_namespace=ns, nonce=nonce
            )
        if client_keys is None:
            return model, []
        # Jobs come and go with nonces: the gateway lists none of them statically, it finds
        # them from the API (gateway.k8sdiscovery).
        gateway = gateway_group(
            ns, site, [], client_keys=client_keys, metrics_token=new_key(), discover=True
        )
        return model, gateway + monitoring_objects(ns, site, [])

    def render_script(self, spec: ModelSpec) -> str:
        """The objects ``submit`` would create, as one multi-document YAML (keys masked)."""
        return self._render(spec)

    def _render(self, spec: ModelSpec | PoolSpec, catalogue: tuple[ModelSpec, ...] = ()) -> str:
        namespace = spec.kubernetes.namespace or "default"
        nonce = new_nonce()
        names = names_for(spec, namespace=namespace, nonce=nonce)
        placeholder = "keys: []\n" if self._site().gateway.apply_on_submit else None
        model, gateway = self._groups(
            spec,
            names,
            nonce,
            api_key="<per-job key, made at submit>",
            client_keys=placeholder,
            catalogue=catalogue,
        )
        for obj in gateway:
            if obj["kind"] == "Secret":  # the site's keys.yaml and a token, read at submit
                obj["stringData"] = dict.fromkeys(obj["stringData"], "<made at submit>")
        return "---\n".join(to_yaml(obj) for obj in model + gateway)

    # --- the Protocol --------------------------------------------------------------------

    def render_pool_script(self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...]) -> str:
        """The objects ``submit_pool`` would create (hpc.k8s.pool), keys masked."""
        return self._render(pool, catalogue)

    def submit_pool(
        self, pool: PoolSpec, catalogue: tuple[ModelSpec, ...], request: JobRequest
    ) -> Submitted:
        """Create a swap pool's objects: one Deployment serving every model of ``catalogue``."""
        return self._submit(pool, request, catalogue)

    # --- the Protocol --------------------------------------------------------------------

    def submit(self, spec: ModelSpec, request: JobRequest) -> Submitted:
        """Create the objects; the service writes the pending record once all were accepted.

        The gateway's objects (when the site applies them on submit) are created if absent
        and otherwise left as they are: one gateway serves every job of the namespace.
        """
        return self._submit(spec, request)

    def _submit(
        self,
        spec: ModelSpec | PoolSpec,
        request: JobRequest,
        catalogue: tuple[ModelSpec, ...] = (),
    ) -> Submitted:
        client_keys = (
            read_client_keys(self.site.keys_file) if self._site().gateway.apply_on_submit else None
        )
        namespace = self._namespace(spec)
        names = names_for(spec, namespace=namespace, nonce=request.nonce)
        key = request.api_key.get_secret_value()
        model, gateway = self._groups(
            spec, names, request.nonce, api_key=key, client_keys=client_keys, catalogue=catalogue
        )
        created: list[Manifest] = []
        try:
            for obj in model:
                if self._kube.create(obj, namespace):
                    created.append(obj)
            for obj in gateway:
                if self._kube.create(obj, namespace, shared=True):
                    created.append(obj)
        except KubernetesError:
            for obj in reversed(created):
                self._kube.delete(obj["kind"], obj["metadata"]["name"], namespace, quiet=True)
            raise
        # Where it will listen (routable only once ready): the Service's DNS name and port.
        handle = JobHandle(self.name, names.instance, request.nonce, node=names.service_host)
        return Submitted(handle, node=names.service_host, port=spec.kubernetes.port)

    def _ns_of(self, handle: JobHandle) -> str:
        # A job's node is its Service's DNS name, <service>.<namespace>.svc.
        if handle.node and handle.node.count(".") >= 2:
            return handle.node.split(".")[1]
        return self._kube.default_namespace()

    def status(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """One list of deployments (and of pods, if any waits) per namespace.

        Says what the server itself does, since no wrapper runs in the pod to write it:
        Available → ``serving="ready"``; a running pod → ``serving="starting"``.
        """
        by_ns: dict[str, list[JobHandle]] = {}
        for handle in handles:
            by_ns.setdefault(self._ns_of(handle), []).append(handle)
        out: dict[str, JobStatus] = {}
        for namespace, group in by_ns.items():
            try:
                deployments = self._kube.list("deployments", namespace, MANAGED_SELECTOR)
            except KubernetesError as exc:
                out |= {h.job_id: JobStatus("unknown", exc.message) for h in group}
                continue
            found = {d["metadata"]["name"]: d for d in deployments}
            pods: list[dict[str, Any]] | None = None
            for handle in group:
                dep = found.get(handle.job_id)
                if dep is None:
                    out[handle.job_id] = JobStatus("missing", "no such Deployment")
                    continue
                available = _condition(dep, "Available")
                if available and available.get("status") == "True":
                    out[handle.job_id] = JobStatus(
                        "running", f"available at {handle.node}", serving="ready"
                    )
                    continue
                progressing = _condition(dep, "Progressing")
                if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
                    out[handle.job_id] = JobStatus("failed", progressing.get("message", ""))
                    continue
                failure = _condition(dep, "ReplicaFailure")
                if failure and failure.get("status") == "True":
                    msg = str(failure.get("message", ""))
                    if "exceeded quota" in msg:  # the pod, not the Deployment, hit the quota
                        msg += f" (hint: `kubectl describe resourcequota -n {namespace}`)"
                    out[handle.job_id] = JobStatus("pending", f"replica failure: {msg}")
                    continue
                if pods is None:
                    try:
                        pods = self._kube.list("pods", namespace, MANAGED_SELECTOR)
                    except KubernetesError:
                        pods = []
                out[handle.job_id] = self._pod_status(handle.job_id, pods)
        return out

    def _pod_status(self, job_id: str, pods: list[dict[str, Any]]) -> JobStatus:
        mine = [
            p for p in pods if (p["metadata"].get("labels") or {}).get(INSTANCE_LABEL) == job_id
        ]
        if not mine:
            return JobStatus("pending", "no pod yet")
        pod = mine[-1]
        scheduled = _condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            message = str(scheduled.get("message", ""))
            hint = unschedulable_hint(_required_role(pod), message)
            return JobStatus("pending", f"unschedulable: {message} (hint: {hint})")
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if phase == "Running":
            return JobStatus("running", "engine loading the model", serving="starting")
        if phase == "Failed":
            return JobStatus("failed", "pod failed")
        return JobStatus("pending", f"pod {phase.lower()}")

    def cancel(self, handle: JobHandle) -> None:
        """Delete the job's objects (its weights PVC stays, a cache)."""
        namespace = self._ns_of(handle)
        names = Names(handle.job_id, namespace, pvc="")
        # The ServiceMonitor even if monitoring is off now (the job may predate that), and
        # the Route a job submitted before engines lost theirs may have: absent is fine.
        for kind, name in (
            ("Deployment", names.instance),
            ("Service", names.instance),
            ("NetworkPolicy", names.instance),
            ("ServiceMonitor", names.instance),
            ("Route", names.instance),
            ("Secret", names.secret),
            ("ConfigMap", names.configmap),
        ):
            self._kube.delete(kind, name, namespace)

    def logs(self, handle: JobHandle, *, follow: bool = False) -> Iterator[str]:
        """The engine container's log in the job's newest pod; with ``follow``, streamed."""
        namespace = self._ns_of(handle)
        pods = self._kube.list("pods", namespace, f"{INSTANCE_LABEL}={handle.job_id}")
        if not pods:
            raise KubernetesError(
                f"no pod for {handle.job_id} yet", hint="a pending job has no log until it starts"
            )
        pod = pods[-1]["metadata"]["name"]
        core, _, _ = self._kube.apis()
        resp = self._kube.call(
            f"read the log of pod {pod}",
            namespace,
            core.read_namespaced_pod_log,
            pod,
            namespace,
            container=ENGINE_CONTAINER,
            follow=follow,
        )
        rest = b""
        for chunk in resp.stream(4096):
            rest += chunk
            *lines, rest = rest.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")
        if rest:
            yield rest.decode("utf-8", "replace")
