"""`mt export librechat` against LibreChat's own config schema: the zod ``configSchema`` and
custom ``endpointSchema`` that npm's ``librechat-data-provider`` (the package LibreChat loads
its ``librechat.yaml`` with) publishes, run by node. LibreChat itself is not run here: it
needs MongoDB and its Node app.

The package is a real part (MT_LIBRECHAT_PROVIDER, installed by ``make openwebui`` into a
cache per version): skipped without it, a failure when MT_TEST_REQUIRE names ``librechat``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtcli import mt
from realparts import missing_part

from hpc.export import LIBRECHAT_CONFIG_VERSION

# Read at import, before tests/conftest.py's autouse fixture clears MT_*.
PROVIDER = os.environ.get("MT_LIBRECHAT_PROVIDER", "")
VALIDATOR = Path(__file__).parent / "clients" / "librechat_schema.js"


def _validate(config: dict[str, Any]) -> dict[str, Any]:
    """LibreChat's schema's verdict on ``config`` (node + librechat-data-provider)."""
    node = shutil.which("node")
    if not PROVIDER or not Path(PROVIDER).is_dir() or node is None:
        missing_part(
            "librechat",
            f"MT_LIBRECHAT_PROVIDER={PROVIDER!r}, node={node!r} (make openwebui installs it)",
        )
    done = subprocess.run(
        [str(node), str(VALIDATOR), PROVIDER],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    verdict: dict[str, Any] = json.loads(done.stdout)
    return verdict


@pytest.fixture
def exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `mt export librechat` writes for two models, parsed as LibreChat's YAML loader
    would."""
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n"
        "  - {name: gemma-3-270m, engine: llamacpp, weights: {source: /m.gguf}}\n"
        "  - {name: llama-3.1-8b, engine: vllm, weights: {source: org/llama}, on_demand: {}}\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("MT_HOME", str(tmp_path / "mt-home"))
    monkeypatch.setenv("MT_MODELS", str(models))
    out = tmp_path / "librechat.yaml"
    mt("export", "librechat", "--gateway-url", "http://login1:8081", "-o", str(out))
    config: dict[str, Any] = yaml.safe_load(out.read_text(encoding="utf-8"))
    return config


def test_the_exported_librechat_yaml_passes_librechats_schema(exported: dict[str, Any]) -> None:
    verdict = _validate(exported)
    assert verdict["ok"], verdict["issues"]
    # The file's version is the schema's own: LibreChat warns about an older one.
    assert exported["version"] == verdict["config_version"] == LIBRECHAT_CONFIG_VERSION
    (endpoint,) = exported["endpoints"]["custom"]
    assert endpoint["baseURL"] == "http://login1:8081/v1"
    assert endpoint["apiKey"] == "${MT_API_KEY}"
    assert endpoint["models"] == {"default": ["gemma-3-270m", "llama-3.1-8b"], "fetch": True}


def test_the_schema_check_catches_a_broken_endpoint(exported: dict[str, Any]) -> None:
    # The validation can fail: an endpoint without a baseURL or models is refused.
    broken = json.loads(json.dumps(exported))
    del broken["endpoints"]["custom"][0]["baseURL"]
    broken["endpoints"]["custom"][0]["models"]["default"] = []
    verdict = _validate(broken)
    assert not verdict["ok"]
    paths = {tuple(issue["path"]) for issue in verdict["issues"]}
    assert ("baseURL",) in paths
    assert ("endpoints", "custom", 0, "models", "default") in paths
