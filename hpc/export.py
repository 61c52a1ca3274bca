"""Config snippets that point other tools at ModelTainer: LiteLLM, LibreChat, Open WebUI,
LlamaStack and OpenShift Lightspeed.

Pure functions: each takes the served models (:mod:`hpc.catalog`) and the gateway's URL and
returns the document as data; :func:`render` turns one into the text `mt export` writes.
No key is ever written: a snippet names an environment variable (or, for Lightspeed, a
Kubernetes Secret) that holds it, in the syntax the tool itself resolves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from hpc.catalog import Endpoint, ServedModel
from hpc.errors import MTError

Tool = Literal["litellm", "librechat", "openwebui", "llamastack", "olsconfig"]
TOOLS: tuple[Tool, ...] = ("litellm", "librechat", "openwebui", "llamastack", "olsconfig")

DEFAULT_KEY_ENV = "MT_API_KEY"
DEFAULT_SECRET = "modeltainer-api-key"  # noqa: S105 - a Secret's name, not its value
PROVIDER = "modeltainer"  # the provider/endpoint name each tool shows for the gateway
# librechat.yaml's `version:`: the CONFIG_VERSION of the librechat-data-provider release its
# schema test validates against (Makefile LIBRECHAT_PROVIDER_VERSION; LibreChat warns when a
# file's version is older than its own).
LIBRECHAT_CONFIG_VERSION = "1.3.17"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL = re.compile(r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
# A Kubernetes object name (RFC 1123 subdomain).
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class ExportError(MTError):
    """An export cannot be written as asked (a bad URL, no model to name)."""


@dataclass(frozen=True)
class Export:
    """What `mt export` writes, and the names it had to leave out (with why)."""

    text: str
    skipped: tuple[str, ...] = ()


def api_url(gateway_url: str) -> str:
    """The gateway's OpenAI root: ``http://host:8081`` or ``…/v1/`` → ``http://host:8081/v1``."""
    url = gateway_url.strip().rstrip("/")
    if not _URL.match(url):
        raise ExportError(
            f"not a gateway URL: {gateway_url!r}",
            hint="pass --gateway-url http://HOST:PORT/v1 (the address the tool reaches)",
        )
    return url if url.endswith("/v1") else url + "/v1"


def job_key_env(job: str) -> str:
    """The variable a direct LiteLLM config reads a job's per-job key from."""
    return "MT_JOB_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", job).upper()


def _check_env(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise ExportError(
            f"not an environment variable name: {name!r}", hint="e.g. --key-env MT_API_KEY"
        )
    return name


def _names(models: Sequence[ServedModel]) -> list[str]:
    if not models:
        raise ExportError(
            "no models to export",
            hint="add models to models.yaml (mt models lists what the gateway serves)",
        )
    return [m.name for m in models]


def litellm_config(
    models: Sequence[ServedModel], gateway_url: str, key_env: str = DEFAULT_KEY_ENV
) -> dict[str, Any]:
    """LiteLLM proxy ``config.yaml``: every model through the gateway, as ``openai/<name>``."""
    base = api_url(gateway_url)
    key = f"os.environ/{_check_env(key_env)}"
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {"model": f"openai/{name}", "api_base": base, "api_key": key},
            }
            for name in _names(models)
        ],
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }


def _direct_key(endpoint: Endpoint) -> str:
    if endpoint.job is not None:
        return f"os.environ/{job_key_env(endpoint.job)}"
    if endpoint.api_key_env is not None:
        return f"os.environ/{endpoint.api_key_env}"
    return "none"  # a static backend without a key: LiteLLM's client still wants a value


def litellm_direct_config(models: Sequence[ServedModel]) -> tuple[dict[str, Any], list[str]]:
    """LiteLLM ``config.yaml`` straight at the backends, one entry per ready endpoint under the
    same model name (LiteLLM balances entries that share a name); also the names left out
    because nothing serves them now."""
    entries: list[dict[str, Any]] = []
    skipped: list[str] = []
    for model in models:
        if not model.endpoints:
            skipped.append(model.name)
        for endpoint in model.endpoints:
            if endpoint.record is not None and endpoint.record.tls_sha256:
                raise ExportError(
                    f"{model.name}: job {endpoint.job} serves TLS with a certificate only "
                    "its record vouches for (pinned by the gateway), which LiteLLM cannot pin",
                    hint="export through the gateway (without --direct): it pins every job",
                )
            params = {
                # Straight at the engine: it knows the model's own name, not an alias.
                "model": f"openai/{model.alias_of or model.name}",
                "api_base": endpoint.base_url,
                "api_key": _direct_key(endpoint),
            }
            entries.append({"model_name": model.name, "litellm_params": params})
    if not entries:
        raise ExportError(
            "no ready endpoint to point LiteLLM at directly",
            hint="mt submit a model (or add a static backend) first, or export without --direct",
        )
    config = {
        "model_list": entries,
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }
    return config, skipped


def librechat_config(
    models: Sequence[ServedModel], gateway_url: str, key_env: str = DEFAULT_KEY_ENV
) -> dict[str, Any]:
    """``librechat.yaml`` with the gateway as one custom endpoint (``${VAR}`` from LibreChat's
    ``.env``); ``fetch`` lets models submitted later show up without editing the file."""
    names = _names(models)
    return {
        "version": LIBRECHAT_CONFIG_VERSION,
        "cache": True,
        "endpoints": {
            "custom": [
                {
                    "name": "ModelTainer",
                    "apiKey": "${" + _check_env(key_env) + "}",
                    "baseURL": api_url(gateway_url),
                    "models": {"default": names, "fetch": True},
                    "titleConvo": True,
                    "titleModel": "current_model",
                    "modelDisplayLabel": "ModelTainer",
                }
            ]
        },
    }


def openwebui_compose(
    models: Sequence[ServedModel], gateway_url: str, key_env: str = DEFAULT_KEY_ENV
) -> dict[str, Any]:
    """A ``docker-compose`` override giving Open WebUI the gateway as its OpenAI connection
    (Compose fills ``${VAR}`` from the shell or ``.env``); Open WebUI lists the models from
    the gateway's ``/v1/models``, and the first one is the default for new chats."""
    names = _names(models)
    return {
        "services": {
            "open-webui": {
                "environment": {
                    "ENABLE_OPENAI_API": "true",
                    "OPENAI_API_BASE_URLS": api_url(gateway_url),
                    "OPENAI_API_KEYS": "${" + _check_env(key_env) + "}",
                    "DEFAULT_MODELS": names[0],
                }
            }
        }
    }


def llamastack_run(
    models: Sequence[ServedModel], gateway_url: str, key_env: str = DEFAULT_KEY_ENV
) -> dict[str, Any]:
    """A whole LlamaStack (0.7) run config that `llama stack run FILE` starts: the gateway as
    a ``remote::openai`` inference provider (LlamaStack's generic OpenAI-compatible one, with
    ``base_url``), each model registered under it, and SQLite stores under
    ``${env.SQLITE_STORE_DIR}`` (default ``~/.llama/distributions/modeltainer``); it listens
    on 127.0.0.1:8321 (``--port`` changes the port)."""
    names = _names(models)
    store_dir = "${env.SQLITE_STORE_DIR:=~/.llama/distributions/" + PROVIDER + "}"
    return {
        "version": 2,
        "distro_name": PROVIDER,
        "apis": ["inference"],
        "providers": {
            "inference": [
                {
                    "provider_id": PROVIDER,
                    "provider_type": "remote::openai",
                    "config": {
                        "base_url": api_url(gateway_url),
                        "api_key": "${env." + _check_env(key_env) + "}",
                    },
                }
            ]
        },
        "storage": {
            "backends": {
                "kv_default": {"type": "kv_sqlite", "db_path": store_dir + "/kvstore.db"},
                "sql_default": {"type": "sql_sqlite", "db_path": store_dir + "/sql_store.db"},
            },
            "stores": {
                "metadata": {"namespace": "registry", "backend": "kv_default"},
                "inference": {"table_name": "inference_store", "backend": "sql_default"},
                "conversations": {"table_name": "openai_conversations", "backend": "sql_default"},
                "prompts": {"namespace": "prompts", "backend": "kv_default"},
            },
        },
        "registered_resources": {
            "models": [
                {
                    "model_id": name,
                    "provider_id": PROVIDER,
                    "provider_model_id": name,
                    "model_type": "llm",
                    "metadata": {},
                }
                for name in names
            ]
        },
        # Loopback: the stack has no auth of its own here, and it answers with the key.
        "server": {"host": "127.0.0.1", "port": 8321},
    }


def olsconfig(
    models: Sequence[ServedModel], gateway_url: str, secret: str = DEFAULT_SECRET
) -> dict[str, Any]:
    """An ``OLSConfig`` (``ols.openshift.io/v1alpha1``) whose LLM provider is the gateway, type
    ``openai``; the key is in the Secret ``secret`` (key ``apitoken``), never in the CR."""
    names = _names(models)
    if not _K8S_NAME.match(secret):
        raise ExportError(
            f"not a Kubernetes Secret name: {secret!r}", hint="lowercase, digits, '-' and '.'"
        )
    return {
        "apiVersion": "ols.openshift.io/v1alpha1",
        "kind": "OLSConfig",
        "metadata": {"name": "cluster"},
        "spec": {
            "llm": {
                "providers": [
                    {
                        "name": PROVIDER,
                        "type": "openai",
                        "url": api_url(gateway_url),
                        "credentialsSecretRef": {"name": secret},
                        "models": [{"name": name} for name in names],
                    }
                ]
            },
            "ols": {"defaultModel": names[0], "defaultProvider": PROVIDER},
        },
    }


def _dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


_HEADERS: dict[Tool, str] = {
    "litellm": "LiteLLM proxy config.yaml: litellm --config FILE "
    "(set {key} and LITELLM_MASTER_KEY)",
    "librechat": "librechat.yaml custom endpoint (put {key}=... in LibreChat's .env)",
    "openwebui": "docker-compose override for Open WebUI (export {key}=... before compose up)",
    "llamastack": "LlamaStack run config: {key}=... llama stack run FILE "
    "(SQLITE_STORE_DIR: where its stores go)",
    "olsconfig": "OpenShift Lightspeed OLSConfig; first: oc create secret generic {secret} "
    "-n openshift-lightspeed --from-literal=apitoken=...",
}


def render(
    tool: Tool,
    models: Sequence[ServedModel],
    *,
    gateway_url: str,
    key_env: str = DEFAULT_KEY_ENV,
    secret: str = DEFAULT_SECRET,
    direct: bool = False,
) -> Export:
    """The file `mt export TOOL` writes: a comment saying how to use it, then the document."""
    skipped: list[str] = []
    if direct and tool != "litellm":
        raise ExportError("--direct is for litellm only", hint="the others go through the gateway")
    if direct:
        data, skipped = litellm_direct_config(models)
        header = "LiteLLM proxy config.yaml, straight at the backends: set each os.environ/ key"
    elif tool == "litellm":
        data = litellm_config(models, gateway_url, key_env)
    elif tool == "librechat":
        data = librechat_config(models, gateway_url, key_env)
    elif tool == "openwebui":
        data = openwebui_compose(models, gateway_url, key_env)
    elif tool == "llamastack":
        data = llamastack_run(models, gateway_url, key_env)
    else:
        data = olsconfig(models, gateway_url, secret)
    if not direct:
        header = _HEADERS[tool].format(key=key_env, secret=secret)
    lines = [f"# {header}", "# written by `mt export` (ModelTainer); it holds no key"]
    lines += [f"# not exported (no ready endpoint): {name}" for name in skipped]
    return Export("\n".join(lines) + "\n" + _dump(data), tuple(skipped))
