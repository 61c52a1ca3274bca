"""`mt --version`: the installed distribution's version (from git tags), PEP 440-shaped."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import version

import hpc

# PEP 440's public part plus an optional local label (setuptools-scm's +gHASH / +unknown).
_PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9.]+)?$")


def test_version_flag_prints_the_installed_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    name, _, shown = done.stdout.strip().partition(" ")
    assert name == "mt"
    assert shown == hpc.__version__ == version("modeltainer")
    assert _PEP440.match(shown), shown


def test_version_flag_needs_no_config(tmp_path: object) -> None:
    # Eager: it answers before site.yaml or models.yaml are looked for, so a broken config
    # never hides the version a bug report needs.
    done = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "--site", "/nonexistent/site.yaml", "--version"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mt ")
