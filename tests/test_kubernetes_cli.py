"""`mt render --backend kubernetes` and `mt submit --dry-run --backend kubernetes`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mtcli import mt

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "kustomize" / "models.yaml"
GOLDEN = Path(__file__).parent / "golden" / "k8s" / "layout"


@pytest.fixture(autouse=True)
def models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MT_MODELS", str(EXAMPLE))
    mt("keys", "create", "alice")  # the gateway's client keys ($MT_HOME/keys.yaml)


def test_render_one_model_writes_the_gateway_monitoring_and_the_model(tmp_path: Path) -> None:
    out = tmp_path / "my dir; echo x"  # a hostile path is only a path
    done = mt("render", "--backend", "kubernetes", "-o", str(out), "swap-pool")
    assert "kubectl apply -k" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "gateway",
        "kustomization.yaml",
        "monitoring",
        "swap-pool",
    ]
    objects = [
        "configmap.yaml",
        "deployment.yaml",
        "networkpolicy.yaml",
        "pvc.yaml",
        "secret.yaml",
        "service.yaml",
        "servicemonitor.yaml",
    ]
    model = out / "swap-pool"
    assert sorted(p.name for p in model.iterdir()) == sorted(
        [".gitignore", "kustomization.yaml", *objects]
    )
    kustomization = yaml.safe_load((model / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == objects
    golden = GOLDEN / "swap-pool" / "deployment.yaml"
    assert (model / "deployment.yaml").read_text() == golden.read_text()
    secret = yaml.safe_load((model / "secret.yaml").read_text())
    assert secret["stringData"]["api-key"].startswith("mtj-")
    assert (model / "secret.yaml").stat().st_mode & 0o077 == 0
    # The gateway's Secret: alice's hash from keys.yaml, and a fresh token for Prometheus.
    gw_secret = yaml.safe_load((out / "gateway" / "secret.yaml").read_text())
    keys = yaml.safe_load(gw_secret["stringData"]["keys.yaml"])["keys"]
    assert [k["name"] for k in keys] == ["alice", "prometheus-scrape"]
    assert gw_secret["stringData"]["metrics-token"].startswith("mt-")
    assert (out / "gateway" / "secret.yaml").stat().st_mode & 0o077 == 0
    assert (out / "gateway" / ".gitignore").read_text().endswith("secret.yaml\n")


def test_render_the_layout_with_the_replicas_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    names = ["Qwen3-Coder-30B-A3B", "gpt-oss-20b", "swap-pool"]
    mt("render", "--backend", "kubernetes", "--gateway-replicas", "4", "-o", str(out), *names)
    assert (out / "kustomization.yaml").read_text() == (GOLDEN / "kustomization.yaml").read_text()
    gateway = yaml.safe_load((out / "gateway" / "deployment.yaml").read_text())
    assert gateway["spec"]["replicas"] == 4
    assert not list(out.glob("*/route.yaml"))


def test_render_without_client_keys_says_how_to_make_them(tmp_path: Path) -> None:
    done = mt(
        "render",
        "--backend",
        "kubernetes",
        "--keys",
        str(tmp_path / "none.yaml"),
        "swap-pool",
        check=False,
    )
    assert done.returncode == 1
    assert "error: no client keys for the gateway" in done.stderr
    assert "hint: mt keys create NAME" in done.stderr


def test_dry_run_prints_the_objects_without_a_key() -> None:
    done = mt("submit", "--backend", "kubernetes", "--dry-run", "gpt-oss-20b")
    docs = list(yaml.safe_load_all(done.stdout))
    kinds = [d["kind"] for d in docs]
    assert kinds == [
        "Secret",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "ServiceMonitor",
        # The gateway, which submit creates when the namespace has none yet; it finds the
        # jobs from the API as its own account (gateway.k8sdiscovery).
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
        "ServiceMonitor",
        "PrometheusRule",
        "ConfigMap",
    ]
    assert "mtj-" not in done.stdout
    assert docs[7]["stringData"] == {
        "keys.yaml": "<made at submit>",
        "metrics-token": "<made at submit>",
    }


def test_slurm_renders_one_model_at_a_time(tmp_path: Path) -> None:
    done = mt("render", "-o", str(tmp_path / "x"), "gpt-oss-20b", "swap-pool", check=False)
    assert done.returncode == 2
