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

from gateway.config import GatewayConfig
from gateway.k8sdiscovery import KubeDiscovery, parse_discover
from gateway.keys import create_key
from gateway.reload import Reloader
from hpc import jobs
from hpc.errors import MTError
from hpc.jobs import JobService
from hpc.site import Site, SiteConfig
from hpc.spec import ModelsFile, ModelSpec

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
            running_gateway(
                "--discover", f"kubernetes:{NS}", "--discover-interval", "0.5", stderr_path=log
            )
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


# --- how often the API is asked; swap pools ------------------------------------------------

POOL_MODELS = ModelsFile.model_validate(
    {
        "models": [
            {"name": name, "engine": "llamacpp", "weights": {"source": "a/b", "quant": "Q4_K_M"}}
            for name in ("pool-a", "pool-b")
        ],
        "pools": [
            {
                "name": "swap",
                "models": ["pool-a", "pool-b"],
                "kubernetes": {"namespace": NS, "image": "registry.example.org/mt-pool:0.1.0"},
            }
        ],
    }
)


def _reloader(tmp_path: Path, **settings: Any) -> Reloader:
    registry = tmp_path / "gateway-registry"
    registry.mkdir(mode=0o700)
    config = GatewayConfig(registry_dir=registry, discover=f"kubernetes:{NS}", **settings)
    return Reloader(config=config, env={})


def _service_lists(api: FakeKubeAPI) -> int:
    return sum(1 for method, path in api.requests if method == "GET" and path.endswith("/services"))


def test_the_api_is_asked_every_discover_interval_not_at_every_reload(
    api: FakeKubeAPI, backend: JobService, tmp_path: Path
) -> None:
    """Reloads stat files every second; the API server is asked every discover_interval_s
    (the clock is the test's: ``now`` readings passed in)."""
    alpha = backend.submit(_spec("alpha")).job_id
    api.set_endpoints(alpha, NS, [("10.0.0.1", 8000, True)])
    reloader = _reloader(tmp_path, discover_interval_s=10)
    assert GatewayConfig.model_fields["discover_interval_s"].default == 10
    snapshot = reloader.load_initial(now=100.0)
    assert [u.base_url for u in snapshot.routes.upstreams("alpha")] == ["http://10.0.0.1:8000/v1"]
    assert _service_lists(api) == 1

    api.set_endpoints(alpha, NS, [("10.0.0.2", 8000, True)])  # the pod moved
    for now in (101.0, 102.0, 105.0, 109.9):  # reloads within the interval: no API call
        reloader.poll(now=now)
    assert _service_lists(api) == 1
    snapshot = reloader.poll(now=110.0) or snapshot
    assert _service_lists(api) == 2
    assert [u.base_url for u in snapshot.routes.upstreams("alpha")] == ["http://10.0.0.2:8000/v1"]

    # A failed call waits the interval too: a struggling API server gets no more calls.
    api.fail("GET", "services", 503, "etcd is down", reason="ServiceUnavailable")
    reloader.poll(now=120.0)
    assert _service_lists(api) == 3
    reloader.poll(now=125.0)
    assert _service_lists(api) == 3
    reloader.poll(now=130.0)
    assert _service_lists(api) == 4


def test_a_discovered_pool_is_routed_under_every_catalogue_name(
    api: FakeKubeAPI, backend: JobService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap pool found from the API: its Service names its catalogue, and a real gateway
    routes each name to the pool (its fake engine, requiring the pool's key), as it does a
    submitted pool's registry record."""
    pool = POOL_MODELS.pool("swap")
    assert pool is not None
    instance = backend.submit_pool(pool, POOL_MODELS.catalogue(pool)).job_id
    service = api.objects[("v1", "services", NS, instance)]
    assert json.loads(service["metadata"]["annotations"]["modeltainer.io/serves"]) == [
        "pool-a",
        "pool-b",
    ]
    with ExitStack() as stack:
        # The pool answers with its own key (from its Secret), whichever catalogue name.
        monkeypatch.setenv("MT_FAKE_ENGINE_KEY", _secret_key(api, instance))
        url = stack.enter_context(fake_engine_process("--model", "pool-a"))
        monkeypatch.delenv("MT_FAKE_ENGINE_KEY")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        api.set_endpoints(instance, NS, [("127.0.0.1", port, True)])

        (record,) = KubeDiscovery(NS).records()
        assert (record.model, record.engine, record.serves) == (
            "swap",
            "pool",
            ("pool-a", "pool-b"),
        )

        monkeypatch.setenv("MT_HOME", str(tmp_path / "gateway-home"))
        gateway = stack.enter_context(
            running_gateway("--discover", f"kubernetes:{NS}", "--discover-interval", "0.5")
        )
        _until("the catalogue routed", lambda: _models(gateway) == ["pool-a", "pool-b"])
        for model in ("pool-a", "pool-b"):  # both reach the pool, with its key (else 401)
            status, body = _chat(gateway, model)
            assert status == 200, body
