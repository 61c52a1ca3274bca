"""The Apptainer recipes: a linter, and every image name the project uses has a recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hpc.images import REQUIRED_SECTIONS, image_name, list_recipes, parse_def

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "apptainer"
EXPECTED = {"vllm-cuda", "vllm-rocm", "llamacpp-cuda", "llamacpp-rocm", "llamacpp-cpu"}
DEFS = sorted(RECIPES.glob("*.def"))
# A secret-looking assignment: KEY=..., TOKEN=..., PASSWORD=... with a literal value.
SECRET = re.compile(r"(?i)(api_?key|token|secret|password)\s*=\s*['\"]?[A-Za-z0-9_\-]{8,}")


def test_the_five_recipes_exist() -> None:
    assert {p.stem for p in DEFS} == EXPECTED


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.stem)
def test_recipe_is_complete_and_pinned(path: Path) -> None:
    parsed = parse_def(path.read_text(encoding="utf-8"))
    assert parsed.header.get("Bootstrap") == "docker"
    base = parsed.header.get("From", "")
    image, _, tag = base.rpartition(":") if "@" not in base else (base, "", "")
    assert image and ("@sha256:" in base or tag), f"{path.name}: base {base!r} has no tag"
    assert "@sha256:" in base or re.search(r"\d", tag), f"{path.name}: {tag!r} is not exact"
    assert tag not in {"latest", "server", "server-cuda", "server-rocm", "latest-rocm"}
    assert "latest" not in base
    for section in REQUIRED_SECTIONS:
        assert parsed.sections.get(section), f"{path.name}: %{section} missing or empty"
    labels = parsed.labels
    assert labels["org.modeltainer.recipe"] == path.stem
    assert labels["org.modeltainer.engine"] in {"vllm", "llamacpp"}
    assert labels["org.modeltainer.engine-version"]
    assert labels["org.modeltainer.base"] == base
    accelerator = labels["org.modeltainer.accelerator"]
    assert path.stem.endswith(accelerator)
    if accelerator != "cpu":
        assert labels[f"org.modeltainer.{accelerator}-version"]
    assert "--version" in parsed.sections["test"]


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.stem)
def test_recipe_bakes_in_no_secret_and_no_weights(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not SECRET.search(text)
    assert ".gguf" not in text.lower().replace("<gguf>", "")
    post = parse_def(text).sections.get("post", "")
    for word in ("huggingface-cli", "hf download", "wget", "curl", "snapshot_download"):
        assert word not in post, f"{path.name}: %post fetches something ({word})"


def _image_names_in(text: str) -> set[str]:
    return {image_name(m) for m in re.findall(r"[\w/ ./-]*?([\w.-]+\.sif)\b", text)}


def _used_image_names() -> dict[str, set[str]]:
    """Every .sif name the docs, the sample config, the templates and golden tests use."""
    sources = [
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "docs").rglob("*.yaml")),
        *sorted((ROOT / "hpc" / "templates").glob("*.sbatch")),
        *sorted((ROOT / "tests" / "golden").rglob("*")),
        ROOT / "README.md",
    ]
    found: dict[str, set[str]] = {}
    for source in sources:
        if source.is_file():
            for name in _image_names_in(source.read_text(encoding="utf-8")):
                found.setdefault(name, set()).add(str(source.relative_to(ROOT)))
    return found


def test_every_image_name_used_has_a_recipe() -> None:
    used = _used_image_names()
    assert used, "no .sif names found: the scan is broken"
    recipes = {r.name for r in list_recipes(RECIPES)}
    missing = {name: sorted(where) for name, where in used.items() if name not in recipes}
    assert not missing, f"image names without a recipe: {missing}"


def test_sample_models_yaml_images_are_recipes() -> None:
    data = yaml.safe_load((ROOT / "docs" / "examples" / "models.yaml").read_text())
    images = [m["runtime"]["image"] for m in data["models"] if "runtime" in m]
    assert images
    recipes = {p.stem for p in DEFS}
    assert all(image_name(i) in recipes for i in images)
