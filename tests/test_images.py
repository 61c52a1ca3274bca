"""`mt image build` / `mt image list`: the apptainer argv (golden), fakeroot, failures.

Apptainer cannot be installed here (no Debian package), so the build itself runs against
``fake_apptainer``: a script that prints what a real ``apptainer build`` of a docker base
prints and writes the image file, the way Apptainer does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpc.images import (
    ImageError,
    fakeroot_needed,
    find_recipe,
    list_images,
    list_recipes,
    plan_build,
    run_build,
)
from hpc.site import Site, SiteConfig
from hpc.spec import ModelsFile

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "apptainer"
WEIRD = ["with space", "quote's", 'dq"x', "semi; echo pwned", "new\nline"]


def _site(tmp_path: Path, **slurm: object) -> Site:
    return Site(SiteConfig.model_validate({"slurm": slurm}), tmp_path / "home")


def test_golden_argv_with_fakeroot_and_scratch_dirs(tmp_path: Path) -> None:
    site = _site(
        tmp_path,
        image_dir="/shared/containers",
        apptainer_cachedir="/scratch/alice/apptainer/cache",
        apptainer_tmpdir="/scratch/alice/apptainer/tmp",
    )
    plan = plan_build(find_recipe(RECIPES, "vllm-cuda"), site, fakeroot=True)
    assert plan.argv == [
        "apptainer",
        "build",
        "--fakeroot",
        "/shared/containers/vllm-cuda.sif",
        str(RECIPES / "vllm-cuda.def"),
    ]
    assert plan.env == {
        "APPTAINER_CACHEDIR": "/scratch/alice/apptainer/cache",
        "APPTAINER_TMPDIR": "/scratch/alice/apptainer/tmp",
    }


def test_golden_argv_sandbox_force_as_root(tmp_path: Path) -> None:
    site = _site(tmp_path, image_dir="/shared/containers")
    plan = plan_build(
        find_recipe(RECIPES, "llamacpp-rocm"), site, fakeroot=False, sandbox=True, force=True
    )
    assert plan.argv == [
        "apptainer",
        "build",
        "--force",
        "--sandbox",
        "/shared/containers/llamacpp-rocm",
        str(RECIPES / "llamacpp-rocm.def"),
    ]
    assert plan.env == {}


@pytest.mark.parametrize("weird", WEIRD)
def test_hostile_paths_stay_single_argv_entries(tmp_path: Path, weird: str) -> None:
    image_dir = tmp_path / f"images {weird}"
    site = _site(tmp_path, image_dir=str(image_dir), apptainer_tmpdir=str(tmp_path / weird))
    plan = plan_build(find_recipe(RECIPES, "llamacpp-cpu"), site, fakeroot=True)
    assert plan.argv[-2] == str(image_dir / "llamacpp-cpu.sif")
    assert len(plan.argv) == 5
    assert plan.env["APPTAINER_TMPDIR"] == str(tmp_path / weird)


def test_no_image_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as info:
        plan_build(find_recipe(RECIPES, "vllm-cuda"), _site(tmp_path), fakeroot=False)
    assert "slurm.image_dir" in (info.value.hint or "")


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ImageError) as info:
        find_recipe(RECIPES, "vllm-tpu")
    assert "vllm-cuda" in (info.value.hint or "")


def test_fakeroot_detection() -> None:
    subuid = "bob:100000:65536\n1001:165536:65536\n"
    assert fakeroot_needed(uid=0, user="root", subuid_text="", force=None) is False
    assert fakeroot_needed(uid=0, user="root", subuid_text="", force=True) is False
    assert fakeroot_needed(uid=1000, user="bob", subuid_text=subuid, force=None) is True
    assert fakeroot_needed(uid=1001, user="carol", subuid_text=subuid, force=None) is True
    assert fakeroot_needed(uid=1002, user="dave", subuid_text=None, force=True) is True
    assert fakeroot_needed(uid=1002, user="dave", subuid_text=subuid, force=False) is False
    with pytest.raises(ImageError) as info:
        fakeroot_needed(uid=1002, user="dave", subuid_text=subuid, force=None)
    assert "apptainer config fakeroot --add dave" in (info.value.hint or "")


def _mt(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _site_file(tmp_path: Path) -> Path:
    site = tmp_path / "site.yaml"
    site.write_text(
        "slurm:\n"
        f"  image_dir: {json.dumps(str(tmp_path / 'images'))}\n"
        f"  apptainer_cachedir: {json.dumps(str(tmp_path / 'scratch' / 'cache'))}\n"
        f"  apptainer_tmpdir: {json.dumps(str(tmp_path / 'scratch' / 'tmp'))}\n"
    )
    return site


def test_build_without_apptainer_fails_clearly(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # an empty PATH: no apptainer (python runs by full path)
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir), "MT_HOME": str(tmp_path / "home")}
    done = _mt(
        "--site", str(_site_file(tmp_path)), "image", "build", "vllm-cuda", "--fakeroot", env=env
    )
    assert done.returncode == 1
    assert "error: apptainer is not installed here" in done.stderr
    assert "hint: load it (`module load apptainer`" in done.stderr
    assert "building /" not in done.stderr, "no build announced"


def test_dry_run_prints_the_command(tmp_path: Path) -> None:
    env = {**os.environ, "MT_HOME": str(tmp_path / "home")}
    site = _site_file(tmp_path)
    done = _mt(
        "--site",
        str(site),
        "image",
        "build",
        "llamacpp-cpu",
        "--dry-run",
        "--fakeroot",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["argv"][:2] == ["apptainer", "build"]
    assert plan["target"] == str(tmp_path / "images" / "llamacpp-cpu.sif")
    assert plan["env"]["APPTAINER_TMPDIR"] == str(tmp_path / "scratch" / "tmp")
    assert not (tmp_path / "images").exists(), "a dry run creates nothing"


FAKE_APPTAINER = r"""#!/bin/sh
# Stands for Apptainer (cannot be installed here): prints what `apptainer build` prints for
# a docker base and writes the image, or fails like a fakeroot build that is not allowed.
[ "$1" = build ] || exit 2
shift
target=""
for arg in "$@"; do
  case "$arg" in --*) ;; *) if [ -z "$target" ]; then target="$arg"; fi ;; esac
done
echo "INFO:    User not listed in /etc/subuid, trying root-mapped namespace" >&2
if [ -n "$FAKE_APPTAINER_FAIL" ]; then
  echo "FATAL:   could not use fakeroot: no mapping entry found in /etc/subuid for $(id -un)" >&2
  exit 255
fi
echo "INFO:    Starting build..."
echo "Getting image source signatures"
echo "Copying blob sha256:1f3e46996e2966e4faa5846e56e76e3748b7315e2ded61476c24403d592134f0"
echo "Copying config sha256:4a4b1a2c9c6d8f0e3b5a7d9c1e2f4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f"
echo "Writing manifest to image destination"
echo "INFO:    Extracting OCI image..."
echo "INFO:    Inserting Apptainer configuration..."
echo "INFO:    Running post scriptlet"
echo "cachedir=$APPTAINER_CACHEDIR tmpdir=$APPTAINER_TMPDIR"
echo "INFO:    Creating SIF file..."
printf 'SIF' > "$target"
echo "INFO:    Build complete: $target"
"""


@pytest.fixture
def fake_apptainer(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    script = bin_dir / "apptainer"
    script.write_text(FAKE_APPTAINER)
    script.chmod(0o755)
    return bin_dir


def test_build_streams_progress_and_writes_the_image(tmp_path: Path, fake_apptainer: Path) -> None:
    site = _site(
        tmp_path,
        image_dir=str(tmp_path / "img dir"),
        apptainer_cachedir=str(tmp_path / "scratch" / "cache"),
        apptainer_tmpdir=str(tmp_path / "scratch" / "tmp"),
    )
    plan = plan_build(find_recipe(RECIPES, "llamacpp-cpu"), site, fakeroot=True)
    lines: list[str] = []
    env = {"PATH": f"{fake_apptainer}:/usr/bin:/bin"}
    run_build(plan, on_line=lines.append, environ=env)
    assert lines[0].startswith("INFO:    User not listed")
    assert "INFO:    Creating SIF file..." in lines
    assert (
        f"cachedir={tmp_path / 'scratch' / 'cache'} tmpdir={tmp_path / 'scratch' / 'tmp'}" in lines
    )
    assert plan.target.read_bytes() == b"SIF"
    assert oct((tmp_path / "scratch" / "tmp").stat().st_mode & 0o777) == "0o700"
    with pytest.raises(ImageError) as info:
        run_build(plan, on_line=lines.append, environ=env)
    assert "--force" in (info.value.hint or "")


def test_build_fakeroot_refused_says_so(tmp_path: Path, fake_apptainer: Path) -> None:
    plan = plan_build(
        find_recipe(RECIPES, "vllm-cuda"), _site(tmp_path, image_dir=str(tmp_path)), fakeroot=True
    )
    env = {"PATH": f"{fake_apptainer}:/usr/bin:/bin", "FAKE_APPTAINER_FAIL": "1"}
    with pytest.raises(ImageError) as info:
        run_build(plan, on_line=lambda _: None, environ=env)
    assert "exited 255" in info.value.message
    assert "apptainer config fakeroot --add" in (info.value.hint or "")


def test_cli_build_with_fake_apptainer(tmp_path: Path, fake_apptainer: Path) -> None:
    env = {**os.environ, "PATH": f"{fake_apptainer}:{os.environ['PATH']}"}
    env["MT_HOME"] = str(tmp_path / "home")
    done = _mt(
        "--site", str(_site_file(tmp_path)), "image", "build", "vllm-rocm", "--fakeroot", env=env
    )
    assert done.returncode == 0, done.stderr
    assert "INFO:    Build complete:" in done.stderr
    assert (tmp_path / "images" / "vllm-rocm.sif").is_file()


def test_list_shows_images_and_their_models(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (image_dir / "vllm-cuda.sif").write_bytes(b"x" * 10)
    (image_dir / "custom.sif").write_bytes(b"y")
    models = ModelsFile.model_validate(
        {
            "models": [
                {
                    "name": "big",
                    "engine": "vllm",
                    "weights": {"source": "org/big"},
                    "runtime": {"kind": "apptainer", "image": str(image_dir / "vllm-cuda.sif")},
                },
                {
                    "name": "other-path",
                    "engine": "vllm",
                    "weights": {"source": "org/x"},
                    "runtime": {"kind": "apptainer", "image": "/elsewhere/vllm-cuda.sif"},
                },
                {
                    "name": "mine",
                    "engine": "llamacpp",
                    "weights": {"source": "/m.gguf"},
                    "runtime": {"kind": "apptainer", "image": "/home/me/my.sif"},
                },
                {"name": "bare", "engine": "llamacpp", "weights": {"source": "/m.gguf"}},
            ]
        }
    )
    rows = {row.name: row for row in list_images(list_recipes(RECIPES), image_dir, models)}
    assert rows["vllm-cuda"].built and rows["vllm-cuda"].size_bytes == 10
    assert rows["vllm-cuda"].models == ["big", "other-path"]
    assert not rows["vllm-rocm"].built and rows["vllm-rocm"].models == []
    assert rows["custom"].recipe is None and rows["custom"].built
    assert rows["my"].models == ["mine"] and not rows["my"].built
    assert set(rows) == {
        "vllm-cuda", "vllm-rocm", "llamacpp-cuda", "llamacpp-rocm", "llamacpp-cpu", "custom", "my",
    }  # fmt: skip


def test_cli_list_json(tmp_path: Path) -> None:
    env = {**os.environ, "MT_HOME": str(tmp_path / "home")}
    done = _mt(
        "--site", str(_site_file(tmp_path)), "--models", str(ROOT / "docs/examples/models.yaml"),
        "image", "list", "--json", env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {r["name"] for r in data["recipes"]} >= {"vllm-cuda", "llamacpp-cpu"}
    by_name = {row["name"]: row for row in data["images"]}
    assert by_name["vllm-cuda"]["models"] == ["Qwen3-Coder-30B-A3B"]
