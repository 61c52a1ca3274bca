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


def test_render_one_model_writes_a_kustomize_directory(tmp_path: Path) -> None:
    out = tmp_path / "my dir; echo x"  # a hostile path is only a path
    done = mt("render", "--backend", "kubernetes", "-o", str(out), "swap-pool")
    assert "kubectl apply -k" in done.stderr
    names = sorted(p.name for p in out.iterdir())
    objects = ["configmap.yaml", "deployment.yaml", "pvc.yaml", "secret.yaml", "service.yaml"]
    assert names == sorted([".gitignore", "kustomization.yaml", *objects])
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == objects
    golden = GOLDEN / "swap-pool" / "deployment.yaml"
    assert (out / "deployment.yaml").read_text() == golden.read_text()
    secret = yaml.safe_load((out / "secret.yaml").read_text())
    assert secret["stringData"]["api-key"].startswith("mtj-")
    assert (out / "secret.yaml").stat().st_mode & 0o077 == 0


def test_render_the_layout(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    names = ["Qwen3-Coder-30B-A3B", "gpt-oss-20b", "swap-pool"]
    mt("render", "--backend", "kubernetes", "-o", str(out), *names)
    assert (out / "kustomization.yaml").read_text() == (GOLDEN / "kustomization.yaml").read_text()
    assert (out / "gpt-oss-20b" / "route.yaml").is_file()


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
        "Route",
    ]
    assert "mtj-" not in done.stdout


def test_slurm_renders_one_model_at_a_time(tmp_path: Path) -> None:
    done = mt("render", "-o", str(tmp_path / "x"), "gpt-oss-20b", "swap-pool", check=False)
    assert done.returncode == 2
