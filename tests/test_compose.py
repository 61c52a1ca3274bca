"""The compose recipe for one GPU machine, the gateway's Dockerfile and the nginx snippet.

No Docker engine runs here, and the docker client here has no compose plugin, so the
compose file is checked structurally: keys from the Compose Specification only, the shape
of each field the file uses, the secure defaults, and that `docker compose config -q`
accepts it when a client with the plugin is present.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpc.spec import ModelsFile

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "recipes" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile.gateway"
NGINX = ROOT / "recipes" / "nginx" / "mt-gateway.conf"

# Top-level and service keys of the Compose Specification (compose-spec schema) that this
# file may use; anything else is a typo compose would reject.
TOP_KEYS = {"name", "services", "volumes", "networks", "secrets", "configs"}
SERVICE_KEYS = {
    "build", "cap_drop", "command", "deploy", "entrypoint", "environment", "expose",
    "healthcheck", "image", "ports", "profiles", "read_only", "restart", "security_opt",
    "shm_size", "tmpfs", "user", "volumes", "depends_on", "networks", "cap_add", "ipc",
}  # fmt: skip
HEALTH_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
DURATION = re.compile(r"^(\d+(ns|us|ms|s|m|h))+$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_structure_follows_the_compose_spec(compose: dict[str, Any]) -> None:
    assert set(compose) - {k for k in compose if k.startswith("x-")} <= TOP_KEYS
    assert set(compose["services"]) == {"gateway", "vllm", "llamacpp"}
    for name, service in compose["services"].items():
        unknown = set(service) - SERVICE_KEYS
        assert not unknown, f"{name}: not compose keys: {unknown}"
        assert "image" in service or "build" in service
        assert service["restart"] in {"no", "always", "on-failure", "unless-stopped"}
        for key in ("command", "entrypoint", "cap_drop", "security_opt", "profiles"):
            if key in service:
                assert isinstance(service[key], list), f"{name}.{key} must be a list"
                assert all(isinstance(v, str) for v in service[key]), f"{name}.{key}"
        assert isinstance(service.get("environment", {}), dict)
        health = service["healthcheck"]
        assert set(health) <= HEALTH_KEYS
        assert health["test"][0] in {"CMD", "CMD-SHELL"}
        for key in ("interval", "timeout", "start_period"):
            assert DURATION.match(health[key]), f"{name}.healthcheck.{key}"
        for volume in service.get("volumes", []):
            assert isinstance(volume, str)
            plain = re.sub(r"\$\{[^}]*\}", "VAR", volume)  # ${X:?msg} holds colons
            assert plain.count(":") in (1, 2), volume
            source = plain.split(":")[0]
            named = re.fullmatch(r"[a-z][a-z0-9_-]*", source)
            assert not named or source in compose.get("volumes", {}), f"undeclared {source}"


def test_only_the_gateway_port_is_published_on_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["gateway"]["ports"] == ["127.0.0.1:${MT_GATEWAY_PORT:-8081}:8081"]
    for name in ("vllm", "llamacpp"):
        assert "ports" not in services[name], f"{name} must not publish a port"


def test_secure_defaults(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "cap_add" not in service and "privileged" not in service, name
        assert service.get("ipc") != "host" and service.get("network_mode") != "host", name
    gateway = compose["services"]["gateway"]
    assert gateway["read_only"] is True
    assert gateway["user"] == "10001:10001"
    assert "--keys" in gateway["command"], "beyond loopback the gateway needs client keys"
    assert compose["services"]["llamacpp"]["read_only"] is True
    assert compose["services"]["llamacpp"]["user"] != "0"


def test_engines(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert "hf-cache:/root/.cache/huggingface" in vllm["volumes"]
    assert "hf-cache" in compose["volumes"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    llama = compose["services"]["llamacpp"]
    for flag in ("--ctx-size", "--threads", "--parallel", "--model"):
        assert flag in llama["command"]
    assert any(v.endswith(":/models:ro") for v in llama["volumes"]), "GGUF mounted read-only"


def test_keys_come_from_the_environment_not_the_file(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for name, value in service.get("environment", {}).items():
            if re.search(r"(?i)key|token|secret", name):
                assert str(value).startswith("${"), f"{name} is written in the file"


def test_compose_models_yaml_is_a_models_file(compose: dict[str, Any]) -> None:
    models = ModelsFile.model_validate(yaml.safe_load((COMPOSE_DIR / "models.yaml").read_text()))
    environment = compose["services"]["gateway"]["environment"]
    commands = {n: " ".join(s["command"]) for n, s in compose["services"].items()}
    for backend in models.static:
        host = backend.base_url.split("//")[1].split(":")[0]
        assert host in compose["services"], backend.base_url
        assert backend.api_key_env in environment, "the gateway must get the engine's key"
        assert backend.name in commands[host], "served name must match models.yaml"


def test_docker_compose_config_accepts_it(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    has_plugin = (
        docker is not None
        and (
            subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        ).returncode
        == 0
    )
    if not has_plugin:
        pytest.skip("the docker client here has no compose plugin; checked structurally above")
    env = tmp_path / ".env"
    env.write_text("VLLM_API_KEY=x\nLLAMA_API_KEY=y\nGGUF_DIR=/tmp\nGGUF_FILE=m.gguf\n")
    done = subprocess.run(
        [docker, "compose", "--env-file", str(env), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- the gateway's Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_lint() -> None:
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert bases
    for base in bases:
        tag = base.partition(":")[2]
        assert "@sha256:" in base or re.match(r"^\d+\.\d+\.\d+", tag), f"unpinned base {base}"
        assert "latest" not in base
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "must end as non-root"
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    assert any(word == "USER" for word, _ in steps[last_from:]), "USER in the final stage"
    for word, rest in steps:
        assert not (word == "ADD" and re.search(r"https?://", rest)), "ADD of a URL"
        if word in {"ENV", "ARG"}:
            assert not re.search(r"(?i)(key|token|secret|password)\w*=", rest), rest
    assert not re.search(r"(?i)(api_?key|token|password)\s*[=:]\s*\S{8,}", DOCKERFILE.read_text())
    assert any(word == "HEALTHCHECK" for word, _ in steps)


def test_nginx_snippet_streams_and_matches_the_body_limit() -> None:
    text = NGINX.read_text(encoding="utf-8")
    assert re.search(r"^\s*proxy_buffering off;", text, re.M)
    assert re.search(r"^\s*client_max_body_size 4m;", text, re.M)  # gateway: 4 MiB
    timeout = re.search(r"^\s*proxy_read_timeout (\d+)s;", text, re.M)
    assert timeout and int(timeout.group(1)) >= 600
    assert text.count("{") == text.count("}")
