"""A fake Kubernetes API server: a real aiohttp app speaking the REST paths the client uses.

It stands for the Kubernetes API server, which cannot run on this machine (no kubelet, no
etcd, no container runtime). The official ``kubernetes`` Python client talks to it over
HTTP through a generated kubeconfig (a bearer token, checked), so the backend's real calls,
serialisation and error handling run. It covers what the Kubernetes backend uses:

* ``POST``/``GET``/``DELETE`` and label-selected ``LIST`` of ``apps/v1`` deployments,
  ``v1`` secrets, configmaps, services, persistentvolumeclaims and pods, and OpenShift's
  ``route.openshift.io/v1`` routes;
* ``GET /api/v1/namespaces/{ns}/pods/{pod}/log`` (``follow`` returns what there is);
* ``discovery.k8s.io/v1`` EndpointSlices, set by the test (:meth:`FakeKubeAPI.set_endpoints`)
  as the endpoints controller would.

Objects live in memory per instance. Creating a Deployment also makes its one pod
(``Pending``); the test moves it on with :meth:`FakeKubeAPI.set_available`,
:meth:`FakeKubeAPI.set_running` or :meth:`FakeKubeAPI.set_unschedulable`, and makes calls fail
with :meth:`FakeKubeAPI.fail` (answered with Kubernetes' own ``Status`` objects).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import secrets
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

TOKEN = "fake-token"
_CREATED = "2026-01-01T00:00:00Z"
Key = tuple[str, str, str, str]  # (group/version, plural, namespace, name)


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        name, _, value = term.partition("=")
        if labels.get(name) != value:
            return False
    return True


class FakeKubeAPI:
    """The fake API server; use as a context manager (it runs in its own thread)."""

    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.pod_logs: dict[str, str] = {}
        self.routes_api = True
        self._failures: list[tuple[str, str, int, str, str]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # --- knobs for tests -------------------------------------------------------------------

    def fail(self, method: str, plural: str, code: int, message: str, reason: str = "") -> None:
        """Answer the next ``method`` on ``plural`` with this error (once)."""
        default = {403: "Forbidden", 404: "NotFound", 409: "AlreadyExists", 422: "Invalid"}
        with self._lock:
            self._failures.append((method, plural, code, reason or default.get(code, ""), message))

    def deployment(self, name: str, namespace: str) -> dict[str, Any] | None:
        """The stored Deployment, or None."""
        return self.objects.get(("apps/v1", "deployments", namespace, name))

    def names(self, plural: str, namespace: str) -> list[str]:
        """Names of the stored objects of one kind in one namespace."""
        with self._lock:
            return sorted(k[3] for k in self.objects if k[1] == plural and k[2] == namespace)

    def _pods_of(self, name: str, namespace: str) -> list[dict[str, Any]]:
        return [
            obj
            for (gv, plural, ns, _), obj in self.objects.items()
            if plural == "pods"
            and ns == namespace
            and obj["metadata"]["labels"].get("app.kubernetes.io/instance") == name
        ]

    def set_running(self, name: str, namespace: str) -> None:
        """The pod is scheduled and runs; the engine is still loading (not Available)."""
        with self._lock:
            for pod in self._pods_of(name, namespace):
                pod["status"] = {
                    "phase": "Running",
                    "conditions": [{"type": "PodScheduled", "status": "True"}],
                }

    def set_available(self, name: str, namespace: str) -> None:
        """The Deployment's pod passed its probes: condition ``Available`` is True."""
        self.set_running(name, namespace)
        with self._lock:
            dep = self.objects[("apps/v1", "deployments", namespace, name)]
            dep["status"] = {
                "replicas": 1,
                "readyReplicas": 1,
                "availableReplicas": 1,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            }

    def set_unschedulable(self, name: str, namespace: str, message: str) -> None:
        """The scheduler finds no node for the pod (the message is the scheduler's own)."""
        with self._lock:
            for pod in self._pods_of(name, namespace):
                pod["status"] = {
                    "phase": "Pending",
                    "conditions": [
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": message,
                        }
                    ],
                }

    def set_endpoints(
        self, service: str, namespace: str, endpoints: list[tuple[str, int, bool]]
    ) -> None:
        """The EndpointSlice of ``service`` (what the endpoints controller keeps): each
        (address, port, ready) one endpoint; replaces the last one set."""
        name = f"{service}-slice"
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service},
                "creationTimestamp": _CREATED,
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [address], "conditions": {"ready": ready}}
                for address, _, ready in endpoints
            ],
            "ports": [
                {"name": "http", "port": port, "protocol": "TCP"}
                for port in {p for _, p, _ in endpoints}
            ][:1],
        }
        with self._lock:
            self.objects[("discovery.k8s.io/v1", "endpointslices", namespace, name)] = body

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that points the client at this server with the bearer token."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            f"users:\n- name: fake\n  user:\n    token: {TOKEN}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
            f"    namespace: {namespace}\n"
            "current-context: fake\n",
            encoding="utf-8",
        )
        return path

    # --- the HTTP side ---------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        core = "/api/{version}/namespaces/{ns}/{plural}"
        grouped = "/apis/{group}/{version}/namespaces/{ns}/{plural}"
        for prefix in (core, grouped):
            app.router.add_post(prefix, self._create)
            app.router.add_get(prefix, self._list)
            app.router.add_get(prefix + "/{name}", self._get)
            app.router.add_delete(prefix + "/{name}", self._delete)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._log)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        return await handler(request)

    @staticmethod
    def _gv(request: web.Request) -> str:
        group = request.match_info.get("group")
        version = request.match_info["version"]
        return f"{group}/{version}" if group else version

    def _injected(self, request: web.Request) -> web.Response | None:
        plural = request.match_info.get("plural", "pods")
        with self._lock:
            for i, (method, wanted, code, reason, message) in enumerate(self._failures):
                if method == request.method and wanted == plural:
                    del self._failures[i]
                    return _status(code, reason, message)
        if plural == "routes" and not self.routes_api:
            return _status(404, "NotFound", "the server could not find the requested resource")
        return None

    async def _create(self, request: web.Request) -> web.Response:
        if (err := self._injected(request)) is not None:
            return err
        gv, plural, ns = self._gv(request), request.match_info["plural"], request.match_info["ns"]
        obj = await request.json()
        meta = obj.setdefault("metadata", {})
        name = meta["name"]
        kind = obj.get("kind", plural)
        with self._lock:
            if (gv, plural, ns, name) in self.objects:
                return _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
            meta |= {
                "namespace": ns,
                "uid": secrets.token_hex(8),
                "resourceVersion": "1",
                "creationTimestamp": _CREATED,
            }
            if kind == "Secret" and "stringData" in obj:  # the server keeps data, not stringData
                plain = obj.pop("stringData")
                obj["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in plain.items()}
            self.objects[(gv, plural, ns, name)] = obj
            if plural == "deployments":
                self._make_pod(obj, ns)
        return web.json_response(obj, status=201)

    def _make_pod(self, deployment: dict[str, Any], ns: str) -> None:
        template = copy.deepcopy(deployment["spec"]["template"])
        name = f"{deployment['metadata']['name']}-{secrets.token_hex(4)}-{secrets.token_hex(2)}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": template["metadata"]["labels"],
                "creationTimestamp": _CREATED,
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        self.objects[("v1", "pods", ns, name)] = pod
        self.pod_logs.setdefault(name, "")

    async def _list(self, request: web.Request) -> web.Response:
        if (err := self._injected(request)) is not None:
            return err
        gv, plural, ns = self._gv(request), request.match_info["plural"], request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        with self._lock:
            items = [
                obj
                for (g, p, n, _), obj in self.objects.items()
                if (g, p, n) == (gv, plural, ns)
                and _matches(obj["metadata"].get("labels") or {}, selector)
            ]
            body = {"kind": "List", "apiVersion": gv, "metadata": {}, "items": items}
            return web.json_response(copy.deepcopy(body))

    async def _get(self, request: web.Request) -> web.Response:
        if (err := self._injected(request)) is not None:
            return err
        key = (
            self._gv(request),
            request.match_info["plural"],
            request.match_info["ns"],
            request.match_info["name"],
        )
        with self._lock:
            obj = self.objects.get(key)
            if obj is None:
                return _status(404, "NotFound", f'{key[1]} "{key[3]}" not found')
            return web.json_response(copy.deepcopy(obj))

    async def _delete(self, request: web.Request) -> web.Response:
        if (err := self._injected(request)) is not None:
            return err
        gv, plural, ns = self._gv(request), request.match_info["plural"], request.match_info["ns"]
        name = request.match_info["name"]
        with self._lock:
            if self.objects.pop((gv, plural, ns, name), None) is None:
                return _status(404, "NotFound", f'{plural} "{name}" not found')
            if plural == "deployments":
                for pod in self._pods_of(name, ns):
                    self.objects.pop(("v1", "pods", ns, pod["metadata"]["name"]), None)
        return _status(200, "", "deleted")

    async def _log(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.pod_logs:
            return _status(404, "NotFound", f'pods "{name}" not found')
        return web.Response(text=self.pod_logs[name], content_type="text/plain")

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FakeKubeAPI:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self._app())
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self._runner = runner
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-k8s-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake Kubernetes API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
