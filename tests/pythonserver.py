"""Force llama-cpp-python's server, the fallback `engine: llamacpp` runs without llama-server.

The fallback is what runs when no llama-server is found (hpc.llamacppserver): none on the
PATH and none built into the home's cache. The fixture gives the test (and the `mt`
commands and jobs it starts) a PATH without llama-server and a home without the build.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def python_server_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No llama-server on the PATH and none built under HOME: the Python server runs."""
    kept = [
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not os.access(Path(d) / "llama-server", os.X_OK)
    ]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    home = tmp_path / "home-without-llama-server"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
