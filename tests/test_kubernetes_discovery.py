"""`mt gateway --discover kubernetes:NS`: engines found from the (fake) Kubernetes API.

Jobs are submitted through the real Kubernetes backend into the fake API server (it stands
for a real one, see tests/fake_k8s_api.py); their EndpointSlices point at fake engines
(bench.fakeengine processes on 127.0.0.1, each requiring its job's key), and a real
`mt gateway` process, with a registry of its own (as in its pod), routes to them.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kubernetes", reason="pip install -e '.[kubernetes]'")

from fake_k8s_api import FakeKubeAPI
from fakeengineproc import fake_engine_process
from mtcli import owner_headers, running_gateway

from gateway.k8sdiscovery import parse_discover
from gateway.keys import create_key
from hpc import jobs
from hpc.errors import MTError
from hpc.jobs import JobService
from hpc.site import Site, SiteConfig
from hpc.spec import ModelSpec

NS = "llm"


def _spec(name: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "engine": "vllm",
            "weights": {"source": f"org/{name}"},
            "resources": {"gpus": 1, "cpus": 2, "mem_gb": 4},
            "kubernetes": {"namespace": NS},
        }
    )


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as fake:
        yield fake


@pytest.fixture
def backend(api: FakeKubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobService:
    site = Site(SiteConfig(), tmp_path / "submit-home")
    create_key(site.keys_file, "alice")
    monkeypatch.setenv("KUBECONFIG", str(api.write_kubeconfig(tmp_path / "kubeconfig", NS)))
    return jobs.service(site, "kubernetes")


def _secret_key(api: FakeKubeAPI, instance: str) -> str:
    secret = api.objects[("v1", "secrets", NS, f"{instance}-key")]
    return base64.b64decode(secret["data"]["api-key"]).decode()


def _get(url: str) -> Any:
    request = urllib.request.Request(url, headers=owner_headers())  # noqa: S310 - a local URL
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - a local URL
        return json.loads(resp.read())


def _chat(gateway: str, model: str) -> tuple[int, Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(  # noqa: S310 - a local URL
        f"{gateway}/v1/chat/completions",
        data=body.encode(),
        headers={**owner_headers(), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - a local URL
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _models(gateway: str) -> list[str]:
    return sorted(m["id"] for m in _get(f"{gateway}/v1/models")["data"])


def _until(what: str, check: Any) -> None:
    """Wait for the gateway's next reloads to show ``check()`` (not a timed assertion: the
    limit only stops a broken run)."""
    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_discover_parses_its_value() -> None:
    assert parse_discover("kubernetes") is None
    assert parse_discover("kubernetes:llm") == "llm"
    with pytest.raises(MTError, match="unknown discovery source"):
        parse_discover("consul:llm")


def test_the_gateway_routes_discovered_engines_and_keeps_them_through_an_outage(
    api: FakeKubeAPI,
    backend: JobService,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alpha = backend.submit(_spec("alpha")).job_id
    beta = backend.submit(_spec("beta")).job_id
    with ExitStack() as stack:
        ports = {}
        for instance, model in ((alpha, "alpha"), (beta, "beta")):
            # Each engine requires its own job's key, as a real one started from the Secret.
            monkeypatch.setenv("MT_FAKE_ENGINE_KEY", _secret_key(api, instance))
            url = stack.enter_context(fake_engine_process("--model", model))
            ports[instance] = int(url.rsplit(":", 1)[1].split("/")[0])
        monkeypatch.delenv("MT_FAKE_ENGINE_KEY")
        api.set_endpoints(alpha, NS, [("127.0.0.1", ports[alpha], True)])
        # beta's one pod is not ready yet: not routed, whatever its address.
        api.set_endpoints(beta, NS, [("127.0.0.1", ports[beta], False)])

        # The gateway's own MT_HOME, with an empty registry: its pod's.
        monkeypatch.setenv("MT_HOME", str(tmp_path / "gateway-home"))
        log = tmp_path / "gateway.log"
        gateway = stack.enter_context(
            running_gateway("--discover", f"kubernetes:{NS}", stderr_path=log)
        )
        _until("alpha routed", lambda: _models(gateway) == ["alpha"])
        status, body = _chat(gateway, "alpha")
        assert status == 200, body
        assert body["model"] == "alpha"
        status, body = _chat(gateway, "beta")
        assert status == 404, body

        api.set_endpoints(beta, NS, [("127.0.0.1", ports[beta], True)])
        _until("beta routed", lambda: _models(gateway) == ["alpha", "beta"])
        for model in ("alpha", "beta"):  # each reached with its own key (else the engine's 401)
            status, body = _chat(gateway, model)
            assert status == 200, body
            assert body["model"] == model

        # The API fails: the last routes stay, and the gateway says so.
        for _ in range(5):
            api.fail("GET", "services", 503, "etcd is down", reason="ServiceUnavailable")
        _until("outage warned", lambda: "kubernetes discovery failed" in log.read_text())
        assert _models(gateway) == ["alpha", "beta"]
        status, body = _chat(gateway, "beta")
        assert status == 200, body
        _until("recovered", lambda: "kubernetes discovery recovered" in log.read_text())

        # A cancelled job's Service goes: its model is no longer routed.
        monkeypatch.setenv("MT_HOME", str(tmp_path / "submit-home"))
        jobs.cancel(backend.site, beta)
        monkeypatch.setenv("MT_HOME", str(tmp_path / "gateway-home"))
        _until("beta gone", lambda: _models(gateway) == ["alpha"])
        status, body = _chat(gateway, "alpha")
        assert status == 200, body
