"""The rendered layout as a whole: the gateway in front, NetworkPolicies, monitoring.

Golden files for the gateway's objects (OpenShift flavour); ``kubectl kustomize`` builds the
tree and Kubernetes' schemas check what it built; the NetworkPolicies are evaluated against
the pods the Deployments make; the alert rules name only metrics the real gateway exports;
and the rendered gateway's own keys.yaml and models.yaml run a real gateway.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from fake_upstream import FakeUpstream, Knobs
from realparts import missing_part
from test_gateway_proxy import CHAT, chat
from test_kubernetes_manifests import (
    CLIENT_KEYS,
    EXAMPLE,
    GOLDEN,
    KEY,
    METRICS_TOKEN,
    SITE,
    check_golden,
    validate,
)

from gateway.connections import Connections
from gateway.metrics import Metrics, render_connections, render_probes
from hpc.configfile import load_models
from hpc.errors import MTError
from hpc.k8s.kustomize import layout_tree, to_yaml, write_tree
from hpc.k8s.monitoring import monitoring_objects
from hpc.k8s.naming import names_for
from hpc.k8s.settings import GatewayK8s, KubernetesSite
from hpc.k8s.stack import gateway_group
from hpc.site import SiteConfig
from hpc.spec import ModelSpec

pytestmark = pytest.mark.timeout(60)

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "mt-gateway.json"
# OpenShift: a Route, three replicas, LibreChat and LlamaStack calling from their namespaces.
OPENSHIFT = KubernetesSite(
    gateway=GatewayK8s(
        replicas=3,
        expose="route",
        host="llm.apps.example.org",
        run_as_user=None,
        client_namespaces=("librechat", "llamastack"),
    )
)
# kube-state-metrics' names the rules use for what only the cluster knows.
KUBE_STATE_METRICS = {
    "kube_deployment_status_replicas_available",
    "kube_pod_status_phase",
    "kube_pod_container_resource_requests",
}


def example_objects(site: KubernetesSite = SITE) -> list[dict[str, Any]]:
    """Every object of the example layout, parsed back from the rendered tree."""
    specs = load_models(EXAMPLE).models
    files = layout_tree(
        specs,
        api_keys={s.name: KEY for s in specs},
        client_keys=CLIENT_KEYS,
        metrics_token=METRICS_TOKEN,
        site=site,
    )
    docs = [
        doc
        for rel, text in files.items()
        if rel.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
    ]
    return [doc for doc in docs if doc["kind"] != "Kustomization"]


def gateway_and_monitoring(site: KubernetesSite) -> list[dict[str, Any]]:
    specs = load_models(EXAMPLE).models
    engines = [(spec, names_for(spec, namespace="llm")) for spec in specs]
    objects = gateway_group(
        "llm", site, engines, client_keys=CLIENT_KEYS, metrics_token=METRICS_TOKEN
    )
    return objects + monitoring_objects("llm", site, engines)


def test_openshift_gateway_golden_and_schema() -> None:
    objects = gateway_and_monitoring(OPENSHIFT)
    for obj in objects:
        validate(obj)
    kinds = [o["kind"] for o in objects]
    assert kinds == [
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Route",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ]
    check_golden(GOLDEN / "gateway_openshift.yaml", "---\n".join(to_yaml(o) for o in objects))


def test_discovering_gateway_rbac_golden_and_schema() -> None:
    """The gateway `mt submit` applies: no static engine, `--discover`, its own account with
    read-only access to its namespace, and the only pod with a mounted token."""
    objects = gateway_group(
        "llm", SITE, [], client_keys=CLIENT_KEYS, metrics_token=METRICS_TOKEN, discover=True
    )
    for obj in objects:
        validate(obj)
    by_kind = {o["kind"]: o for o in objects}
    assert list(by_kind) == [
        "Secret",
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "Ingress",
        "NetworkPolicy",
    ]
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mt-gateway"
    assert pod["automountServiceAccountToken"] is True
    assert pod["containers"][0]["command"][-2:] == ["--discover", "kubernetes:llm"]
    for rule in by_kind["Role"]["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"]
    rbac = [by_kind[k] for k in ("ServiceAccount", "Role", "RoleBinding", "Deployment")]
    check_golden(GOLDEN / "gateway_discovery.yaml", "---\n".join(to_yaml(o) for o in rbac))
    # Without discovery: no account, no token (the engines' pods never have one either).
    plain = gateway_group("llm", SITE, [], client_keys=CLIENT_KEYS, metrics_token=METRICS_TOKEN)
    assert not {"ServiceAccount", "Role", "RoleBinding"} & {o["kind"] for o in plain}
    plain_pod = next(o for o in plain if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert plain_pod["automountServiceAccountToken"] is False
    assert "--discover" not in plain_pod["containers"][0]["command"]


def test_kubectl_kustomize_builds_the_tree_and_the_schemas_accept_it(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing_part("kubectl", "kubectl is not on PATH")
    specs = load_models(EXAMPLE).models
    files = layout_tree(
        specs,
        api_keys={s.name: KEY for s in specs},
        client_keys=CLIENT_KEYS,
        metrics_token=METRICS_TOKEN,
        site=OPENSHIFT,
    )
    write_tree(tmp_path / "k8s", files)
    built = subprocess.run(
        [str(kubectl), "kustomize", str(tmp_path / "k8s")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    docs = list(yaml.safe_load_all(built.stdout))
    for doc in docs:
        validate(doc)
    rendered = [
        o for rel, t in files.items() if rel.endswith(".yaml") for o in yaml.safe_load_all(t)
    ]
    expected = sorted(
        (o["kind"], o["metadata"]["name"]) for o in rendered if o["kind"] != "Kustomization"
    )
    assert sorted((d["kind"], d["metadata"]["name"]) for d in docs) == expected
    assert {d["metadata"]["namespace"] for d in docs} == {"llm"}


# --- NetworkPolicies, evaluated ----------------------------------------------------------


def _pods(objects: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, str]]]:
    """(Deployment name, namespace, pod labels) of every pod the layout makes."""
    return [
        (
            o["metadata"]["name"],
            o["metadata"]["namespace"],
            o["spec"]["template"]["metadata"]["labels"],
        )
        for o in objects
        if o["kind"] == "Deployment"
    ]


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # what these policies use
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _admits(peer: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy peer admits a pod (namespaces by their metadata.name label)."""
    ns_selector = peer.get("namespaceSelector")
    ns_ok = (
        _matches(ns_selector, {"kubernetes.io/metadata.name": namespace}) if ns_selector else False
    )
    if "podSelector" not in peer:
        return ns_ok
    pod_ok = _matches(peer["podSelector"], labels)
    return pod_ok and (ns_ok if ns_selector is not None else True)


def test_engine_policies_admit_exactly_the_gateway_pods() -> None:
    objects = example_objects()
    pods = _pods(objects)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    engines = [
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] != "mt-gateway"
    ]
    assert len(engines) == 3
    for engine in engines:
        name = engine["metadata"]["name"]
        (policy,) = [p for p in policies if p["metadata"]["name"] == name]
        selected = [d for d, ns, labels in pods if _matches(policy["spec"]["podSelector"], labels)]
        assert selected == [name]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        pod_rules = [
            r for r in policy["spec"]["ingress"] if any("podSelector" in p for p in r["from"])
        ]
        (rule,) = pod_rules
        admitted = {d for d, ns, labels in pods for p in rule["from"] if _admits(p, ns, labels)}
        assert admitted == {"mt-gateway"}
        # The only other way in: Prometheus' namespace, on the engine's port.
        others = [r for r in policy["spec"]["ingress"] if r is not rule]
        assert [r["from"] for r in others] == [
            [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        ]
        assert all(
            r["ports"] == [{"protocol": "TCP", "port": "http"}] for r in policy["spec"]["ingress"]
        )


def test_the_gateway_policy_selects_only_its_pods_and_admits_router_clients_prometheus() -> None:
    objects = example_objects(OPENSHIFT)
    pods = _pods(objects)
    (policy,) = [
        o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "mt-gateway"
    ]
    assert [d for d, _, labels in pods if _matches(policy["spec"]["podSelector"], labels)] == [
        "mt-gateway"
    ]
    peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
    assert all("podSelector" not in p for p in peers)  # whole namespaces, no pod of ours
    assert [p["namespaceSelector"]["matchLabels"] for p in peers] == [
        {"policy-group.network.openshift.io/ingress": ""},
        {"kubernetes.io/metadata.name": "librechat"},
        {"kubernetes.io/metadata.name": "llamastack"},
        {"kubernetes.io/metadata.name": "monitoring"},
    ]
    # An engine's namespace is not among them: engines never call the gateway.
    assert not any(_admits(p, "llm", {}) for p in peers)


# --- the way in ---------------------------------------------------------------------------


def test_no_route_or_ingress_targets_an_engine() -> None:
    for site in (SITE, OPENSHIFT):
        objects = example_objects(site)
        services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
        targets = []
        for obj in objects:
            if obj["kind"] == "Route":
                targets.append(obj["spec"]["to"]["name"])
            elif obj["kind"] == "Ingress":
                for rule in obj["spec"]["rules"]:
                    targets += [p["backend"]["service"]["name"] for p in rule["http"]["paths"]]
        assert targets == ["mt-gateway"]
        # ... and that Service reaches the gateway's pods and nothing else.
        selector = {"matchLabels": services["mt-gateway"]["spec"]["selector"]}
        assert [d for d, _, labels in _pods(objects) if _matches(selector, labels)] == [
            "mt-gateway"
        ]


def test_streaming_timeouts_and_no_buffering() -> None:
    (route,) = [o for o in gateway_and_monitoring(OPENSHIFT) if o["kind"] == "Route"]
    assert route["metadata"]["annotations"] == {"haproxy.router.openshift.io/timeout": "3600s"}
    assert route["spec"]["tls"]["termination"] == "edge"
    (ingress,) = [o for o in gateway_and_monitoring(SITE) if o["kind"] == "Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_the_gateway_deployment_is_ha_and_hardened() -> None:
    (dep,) = [o for o in gateway_and_monitoring(OPENSHIFT) if o["kind"] == "Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    assert "runAsUser" not in pod["securityContext"]  # OpenShift's SCC picks it
    assert pod["securityContext"]["runAsNonRoot"] is True
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert _matches(
        term["podAffinityTerm"]["labelSelector"], spec["template"]["metadata"]["labels"]
    )
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["requests"]
    (gw,) = pod["containers"]
    assert gw["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Engine keys come from the engines' Secrets; no key is in the Deployment itself.
    assert KEY not in json.dumps(dep) and METRICS_TOKEN not in json.dumps(dep)
    (pdb,) = [o for o in gateway_and_monitoring(OPENSHIFT) if o["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"] == spec["selector"]


def test_engines_in_several_namespaces_are_refused() -> None:
    specs = [
        ModelSpec.model_validate(
            {
                "name": n,
                "engine": "llamacpp",
                "weights": {"source": "a/b"},
                "kubernetes": {"namespace": n},
            }
        )
        for n in ("one", "two")
    ]
    with pytest.raises(MTError, match="several namespaces"):
        layout_tree(
            specs,
            api_keys={"one": KEY, "two": KEY},
            client_keys=CLIENT_KEYS,
            metrics_token=METRICS_TOKEN,
            site=SITE,
        )


# --- monitoring ---------------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    """Every family a real gateway's /metrics declares (``# TYPE`` lines)."""
    text = (
        Metrics().render(replicas={})
        + render_probes({})
        + render_connections(Connections(None, None))
    )
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def test_alerts_name_only_metrics_that_exist() -> None:
    (rule,) = [o for o in gateway_and_monitoring(SITE) if o["kind"] == "PrometheusRule"]
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert {a["alert"] for a in alerts} == {
        "MTGatewayNoReadyReplica",
        "MTModelErrorRatio",
        "MTModelSlowFirstToken",
        "MTModelNoReadyReplica",
        "MTGPUPodPending",
    }
    exported = _exported_metric_names()
    used = set()
    for alert in alerts:
        expr = alert["expr"]
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{", expr))
        # Every metric is written with a selector, so a bare name is not one we missed.
        assert {w for w in re.findall(r"\b(?:mt|kube)_[a-z_]+\b", expr)} == names, expr
        used |= names
    gateway_names = {n for n in used if n.startswith("mt_")}
    assert gateway_names == {
        "mt_gateway_requests_total",
        "mt_gateway_time_to_first_token_seconds_bucket",
    }
    assert {_family(n) for n in gateway_names} <= exported
    assert used - gateway_names <= KUBE_STATE_METRICS
    # One "no ready replica" alert per model, with the model's own start-up budget.
    per_model = {
        a["labels"]["model"]: a["for"] for a in alerts if a["alert"] == "MTModelNoReadyReplica"
    }
    assert per_model == {"Qwen3-Coder-30B-A3B": "30m", "gpt-oss-20b": "20m", "swap-pool": "10m"}


def test_the_check_catches_a_metric_the_gateway_does_not_export() -> None:
    """The parse above would see a renamed metric: it is not among the exported ones."""
    exported = _exported_metric_names()
    assert "mt_gateway_requests_total" in exported
    assert _family("mt_gateway_time_to_first_token_seconds_bucket") in exported
    assert "mt_gateway_errors_total" not in exported


def test_monitors_scrape_with_a_secret_and_the_dashboard_is_the_repos() -> None:
    objects = gateway_and_monitoring(SITE)
    (monitor,) = [o for o in objects if o["kind"] == "ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["authorization"]["credentials"] == {
        "name": "mt-gateway-keys",
        "key": "metrics-token",
    }
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert secret["stringData"]["metrics-token"] == METRICS_TOKEN
    (board,) = [o for o in objects if o["metadata"]["name"] == "mt-grafana-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert board["data"]["mt-gateway.json"] == DASHBOARD.read_text(encoding="utf-8")
    disabled = KubernetesSite.model_validate({"monitoring": {"enabled": False}})
    names = {(o["kind"], o["metadata"]["name"]) for o in gateway_and_monitoring(disabled)}
    assert not {kind for kind, _ in names} & {"ServiceMonitor", "PrometheusRule"}
    assert ("ConfigMap", "mt-grafana-dashboard") not in names


# --- the rendered gateway, run ----------------------------------------------------------------


def _resolve_env(
    container: dict[str, Any], secrets: dict[str, dict[str, str]], paths: dict[str, str]
) -> dict[str, str]:
    """A container's environment as the kubelet sets it: values (pod paths mapped to this
    machine's) and ``secretKeyRef``s read from the rendered Secrets."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = _mapped(entry["value"], paths)
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def _mapped(text: str, paths: dict[str, str]) -> str:
    for pod_path, here in paths.items():
        text = text.replace(pod_path, here)
    return text


@contextlib.contextmanager
def _pod_gateway(
    container: dict[str, Any], env: dict[str, str], paths: dict[str, str]
) -> Iterator[str]:
    """The gateway container's own command, run here (on loopback, a free port)."""
    argv = [_mapped(arg, paths) for arg in container["command"]]
    assert argv[0] == "mt"
    argv[argv.index("--host") + 1] = "127.0.0.1"  # the pod's 0.0.0.0 is its own network
    argv[argv.index("--port") + 1] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc.cli", *argv[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stderr.read()
        yield line.split("listening on", 1)[1].strip()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


async def test_the_rendered_gateway_pod_runs_here(tmp_path: Path) -> None:
    """The gateway pod's init container and gateway container, with their rendered
    command, environment, Secret and ConfigMap, run here as they would in the pod: a client
    key calls the model with the engine's key; the metrics token reads /metrics and may
    call no model."""
    alice = "mt-alice-key-for-the-rendered-gateway"
    client_keys = f"keys:\n- name: alice\n  sha256: {hashlib.sha256(alice.encode()).hexdigest()}\n"
    spec = ModelSpec.model_validate(
        {
            "name": "tiny",
            "engine": "llamacpp",
            "weights": {"source": "a/b"},
            "kubernetes": {"namespace": "llm"},
        }
    )
    files = layout_tree(
        [spec],
        api_keys={"tiny": KEY},
        client_keys=client_keys,
        metrics_token=METRICS_TOKEN,
        site=SITE,
    )
    objects = [
        o
        for rel, text in files.items()
        if rel.endswith(".yaml") and not rel.endswith("kustomization.yaml")
        for o in yaml.safe_load_all(text)
    ]
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects if o["kind"] == "Secret"}
    (config,) = [o for o in objects if o["metadata"]["name"] == "mt-gateway-models"]
    (dep,) = [
        o for o in objects if o["metadata"]["name"] == "mt-gateway" and o["kind"] == "Deployment"
    ]
    pod = dep["spec"]["template"]["spec"]
    # The pod's volumes, as directories here: an emptyDir (0777, as the kubelet makes it),
    # the Secret's items and the ConfigMap's files.
    paths = {
        p: str(tmp_path / p.strip("/").replace("/", "-"))
        for p in ("/var/lib/mt", "/etc/mt/secret", "/etc/mt/models")
    }
    Path(paths["/var/lib/mt"]).mkdir()
    Path(paths["/var/lib/mt"]).chmod(0o777)
    (keys_volume,) = [v["secret"] for v in pod["volumes"] if "secret" in v]
    Path(paths["/etc/mt/secret"]).mkdir()
    for item in keys_volume["items"]:
        (Path(paths["/etc/mt/secret"]) / item["path"]).write_text(
            secrets[keys_volume["secretName"]][item["key"]]
        )
    (init,) = pod["initContainers"]
    done = subprocess.run(
        [_mapped(arg, paths) for arg in init["command"]],
        env={"PATH": os.environ["PATH"], **_resolve_env(init, secrets, paths)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (gateway_container,) = pod["containers"]
    async with FakeUpstream(Knobs(require_key=KEY)) as fake:
        models = yaml.safe_load(config["data"]["models.yaml"])
        (entry,) = models["static"]
        assert entry["base_url"] == "http://mt-tiny.llm.svc:8000/v1"
        entry["base_url"] = fake.base_url  # the Service's DNS name resolves only in a cluster
        Path(paths["/etc/mt/models"]).mkdir()
        (Path(paths["/etc/mt/models"]) / "models.yaml").write_text(yaml.safe_dump(models))
        env = _resolve_env(gateway_container, secrets, paths)
        assert env[entry["api_key_env"]] == KEY  # the engine's key, from the engine's Secret
        with _pod_gateway(gateway_container, env, paths) as url:
            async with aiohttp.ClientSession() as client:
                async with client.get(url + "/healthz") as resp:  # the probes need no key
                    assert resp.status == 200
                good = {"Authorization": f"Bearer {alice}"}
                async with client.post(url + CHAT, json=chat("tiny"), headers=good) as resp:
                    assert resp.status == 200
                scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
                async with client.get(url + "/metrics", headers=scrape) as resp:
                    assert resp.status == 200
                    assert "mt_gateway_requests_total" in await resp.text()
                async with client.post(url + CHAT, json=chat("tiny"), headers=scrape) as resp:
                    assert resp.status == 403
                async with client.get(url + "/metrics") as resp:
                    assert resp.status == 401
    assert fake.seen.authorization == [f"Bearer {KEY}"]
    home = Path(env["MT_HOME"])
    assert (home.stat().st_mode & 0o777, (home / "keys.yaml").stat().st_mode & 0o777) == (
        0o700,
        0o600,
    )


def test_the_site_settings_in_the_docs_are_valid() -> None:
    """docs/kubernetes.md's `kubernetes:` block is a site.yaml the code accepts, as shown."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md").read_text()
    section = text.split("## Site settings (`kubernetes:` in site.yaml)", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = SiteConfig.model_validate(yaml.safe_load(block))
    k8s = config.kubernetes
    assert (k8s.gateway.replicas, k8s.gateway.expose, k8s.gateway.run_as_user) == (3, "route", None)
    assert k8s.gateway.client_namespaces == ("librechat", "llamastack")
    assert k8s.gpu_types == {"a100": "NVIDIA-A100-SXM4-80GB"}
