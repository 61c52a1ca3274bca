"""The import layers of pyproject.toml's ``[tool.importlinter]`` hold, and each one can fail.

``make lint`` runs ``lint-imports`` on the real tree. These tests run it on a copy of the
tree, first as it is (kept), then with one deliberate wrong-way import added per contract:
the run must fail and name the contract and the import, so a contract that can no longer
fail (a typo in a module name, a too-wide ignore) is caught here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hpc", "gateway", "tunnels", "bench")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="lint-imports is not installed (pip install -e '.[dev]')"
)


def _copy_tree(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)  # the copy, not the installed tree, is what grimp reads
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _add_import(tree: Path, module: str, statement: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    text = path.read_text(encoding="utf-8")
    # After the module docstring and `from __future__`, where imports go.
    marker = "from __future__ import annotations\n"
    assert marker in text, f"{path} has no `from __future__ import annotations` line"
    path.write_text(text.replace(marker, marker + statement + "\n", 1), encoding="utf-8")


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_tree(tmp_path_factory.mktemp("layers"))


def test_the_tree_keeps_every_contract(clean_tree: Path) -> None:
    result = _lint(clean_tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "statement", "contract"),
    [
        # the core reaching up into the gateway (what hpc/swappool.py once did)
        ("hpc.registry", "import gateway.errors", "the hpc core imports nothing above it"),
        ("hpc.job.plan", "import tunnels.engines", "the hpc core imports nothing above it"),
        ("hpc.spec", "import hpc.cli.output", "the hpc core imports nothing above it"),
        ("gateway.balancer", "import hpc.cli.context", "never import the CLI"),
        ("gateway.ratelimit", "import tunnels.backoff", "gateway and the tunnels are independent"),
        ("tunnels.backoff", "import bench.workload", "never import bench"),
        # a cycle between siblings (what hpc/site.py <-> hpc/sshexec.py once was)
        ("hpc.privatefile", "import hpc.registry", "no cycles"),
    ],
)
def test_a_wrong_way_import_breaks_its_contract(
    tmp_path: Path, module: str, statement: str, contract: str
) -> None:
    tree = _copy_tree(tmp_path)
    _add_import(tree, module, statement)
    result = _lint(tree)
    assert result.returncode != 0, f"{statement!r} in {module} kept every contract"
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    # the report names the import that was added (cycles name siblings relatively: ".privatefile")
    assert "." + module.rsplit(".", 1)[-1] + " " in broken or module + " ->" in broken, broken


# Modules a little over the ~400-line mark, each one concept that reads best whole.
_LONG_MODULES = {
    "gateway/ondemand/controller.py": "the on-demand lifecycle: submit, adopt, scale, reap",
}
_MAX_LINES = 400


def test_modules_stay_small() -> None:
    too_long = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = path.relative_to(ROOT).as_posix()
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > _MAX_LINES and name not in _LONG_MODULES:
                too_long[name] = lines
    assert not too_long, f"split these by concern (or say why in _LONG_MODULES): {too_long}"


@pytest.mark.parametrize("module", ["hpc.jobwrap", "hpc.swappool"])
def test_the_old_entry_points_still_start(module: str) -> None:
    """Job scripts queued before the move to hpc/job/ call these paths; they must still run."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "--plan" in result.stdout
