"""Which llama.cpp server ``engine: llamacpp`` runs, and whether the spec's flags fit it.

llama.cpp's own C++ ``llama-server`` (what the recipes' images run) is the default; the
first found of:

1. the image's ``llama-server``, when the model runs in a container (``runtime.kind``);
2. the site's ``llamacpp.server`` (site.yaml), a path to a ``llama-server`` binary;
3. ``llama-server`` on the PATH;
4. ModelTainer's own build, :func:`cached_build` (``make llama-server`` or
   ``python -m hpc.dev.llama_server`` builds it once per machine);
5. llama-cpp-python's OpenAI server (hpc.job.llamacpp_python), the supported fallback.

The two servers take different flags (``--ctx-size`` against ``--n_ctx``): a spec whose
``engine_args`` belong to the other one fails at submit, naming the flag, rather than with
"unrecognized arguments" inside the job.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hpc.errors import EngineError
from hpc.spec import ModelSpec, PoolSpec

# The llama.cpp tree llama-cpp-python 0.3.36 vendors (upstream build b11312), built with the
# portable AVX2 flags: the Makefile's LLAMA_SERVER_DIR says the same.
BUILD_VERSION = "0.3.36"
BUILD_FLAVOUR = "avx2"
BUILD_HINT = "build ModelTainer's own once (about 5 minutes): `python -m hpc.dev.llama_server`"

ServerKind = Literal["site", "path", "cache", "python"]

_KIND_SAYS = {
    "site": "llama-server from the site's llamacpp.server",
    "path": "llama-server found on the PATH",
    "cache": "ModelTainer's own llama-server build",
    "python": "llama-cpp-python's server (fallback: no llama-server found)",
}


class LlamaCppSite(BaseModel):
    """site.yaml's ``llamacpp:``: the llama-server binary the site's jobs run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: Path | None = Field(
        default=None,
        description="the llama-server binary as compute nodes see it (default: "
        "`llama-server` on the PATH, else ModelTainer's own build, else llama-cpp-python's "
        "server)",
    )


class LlamaCppServer(BaseModel):
    """The server a job runs for ``engine: llamacpp`` outside a container (in a job's plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ServerKind
    path: str | None = Field(default=None, description="the llama-server binary; None: python")

    @property
    def is_llama_server(self) -> bool:
        """llama.cpp's C++ server (the other kind is llama-cpp-python's)."""
        return self.kind != "python"

    def describe(self) -> str:
        """One line for people: which server and where it is."""
        says = _KIND_SAYS[self.kind]
        return f"{says} ({self.path})" if self.path else says


def cached_build(home: Path | None = None) -> Path:
    """Where ModelTainer's own llama-server is built (the Makefile's ``LLAMA_SERVER``)."""
    base = home if home is not None else Path.home()
    name = f"llama-server-{BUILD_VERSION}-{BUILD_FLAVOUR}"
    return base / ".cache" / "modeltainer" / name / "llama-server"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def host_server(configured: Path | None, environ: Mapping[str, str]) -> LlamaCppServer:
    """The llama.cpp server a job outside a container runs here (see the module doc).

    ``environ``'s PATH and HOME are searched (the job's own, on a node).
    """
    if configured is not None:
        path = configured.expanduser()
        if not _executable(path):
            raise EngineError(
                f"site setting llamacpp.server: {path} is not an executable file",
                hint="point llamacpp.server in site.yaml at a llama-server binary that "
                "compute nodes can run, or remove it to use the default (ModelTainer's own "
                "build: `python -m hpc.dev.llama_server`)",
            )
        return LlamaCppServer(kind="site", path=str(path))
    found = shutil.which("llama-server", path=environ.get("PATH"))
    if found is not None:
        return LlamaCppServer(kind="path", path=found)
    home = environ.get("HOME")
    cached = cached_build(Path(home) if home else None)
    if _executable(cached):
        return LlamaCppServer(kind="cache", path=str(cached))
    return LlamaCppServer(kind="python")


def server_for(
    specs: Iterable[ModelSpec],
    configured: Path | None,
    environ: Mapping[str, str],
    *,
    here: bool = True,
) -> LlamaCppServer | None:
    """The host server ``specs`` (a model, or a pool's catalogue as its slots run it) run,
    every one's flags checked against it; None: no llama.cpp model outside a container.

    ``here``: jobs run where this machine's PATH and home directory are the nodes' (the
    local backend; Slurm run from the login node). Not here (Slurm over SSH from a laptop),
    only the site's setting is taken on trust, else None: the node chooses when the job
    starts, and checks the flags then.
    """
    chosen: LlamaCppServer | None = None
    for spec in specs:
        if spec.engine != "llamacpp":
            continue
        if spec.runtime.kind != "none":
            check_engine_args(spec, None)
            continue
        if chosen is None:
            if here:
                chosen = host_server(configured, environ)
            elif configured is not None:
                chosen = LlamaCppServer(kind="site", path=str(configured))
            else:
                continue
        check_engine_args(spec, chosen)
    return chosen


def server_for_pool(
    pool: PoolSpec,
    catalogue: Iterable[ModelSpec],
    configured: Path | None,
    environ: Mapping[str, str],
    *,
    here: bool = True,
) -> LlamaCppServer | None:
    """:func:`server_for` a swap pool's catalogue, each model in the pool's runtime if set."""
    runs = [
        spec.model_copy(update={"runtime": pool.runtime}) if pool.runtime else spec
        for spec in catalogue
    ]
    return server_for(runs, configured, environ, here=here)


def describe(spec: ModelSpec, server: LlamaCppServer | None) -> str:
    """Which server ``spec`` runs, for the job script's ``# Server:`` line (``--dry-run``)."""
    if spec.runtime.kind != "none":
        return f"the image's llama-server ({spec.runtime.image})"
    if server is None:
        return (
            "chosen on the node when the job starts: llama-server on the PATH, else "
            "ModelTainer's own build, else llama-cpp-python's server"
        )
    return server.describe()


# llama-cpp-python 0.3.36's server flags: its settings' fields (ModelSettings and
# ServerSettings), each `--name`; tests/test_llamacppserver.py checks the list against them.
PYTHON_SERVER_FLAGS = frozenset(
    [
        "api_key",
        "cache",
        "cache_size",
        "cache_type",
        "chat_format",
        "chat_template_kwargs",
        "clip_model_path",
        "config_file",
        "disable_ping_events",
        "draft_model",
        "draft_model_num_pred_tokens",
        "embedding",
        "flash_attn",
        "hf_model_repo_id",
        "hf_pretrained_model_name_or_path",
        "hf_tokenizer_config_path",
        "host",
        "interrupt_requests",
        "kv_overrides",
        "last_n_tokens_size",
        "logits_all",
        "lora_base",
        "lora_path",
        "main_gpu",
        "model",
        "model_alias",
        "mul_mat_q",
        "n_batch",
        "n_ctx",
        "n_gpu_layers",
        "n_threads",
        "n_threads_batch",
        "n_ubatch",
        "numa",
        "offload_kqv",
        "port",
        "root_path",
        "rope_freq_base",
        "rope_freq_scale",
        "rope_scaling_type",
        "rpc_servers",
        "seed",
        "split_mode",
        "ssl_certfile",
        "ssl_keyfile",
        "tensor_split",
        "type_k",
        "type_v",
        "use_mlock",
        "use_mmap",
        "verbose",
        "vocab_only",
        "yarn_attn_factor",
        "yarn_beta_fast",
        "yarn_beta_slow",
        "yarn_ext_factor",
        "yarn_orig_ctx",
    ]
)

# The same setting in both servers: llama-server's spelling -> llama-cpp-python's.
_SAME = {
    "--ctx-size": "--n_ctx",
    "-c": "--n_ctx",
    "--n-gpu-layers": "--n_gpu_layers",
    "--gpu-layers": "--n_gpu_layers",
    "-ngl": "--n_gpu_layers",
    "--threads": "--n_threads",
    "-t": "--n_threads",
    "--batch-size": "--n_batch",
    "-b": "--n_batch",
    "--ubatch-size": "--n_ubatch",
    "-ub": "--n_ubatch",
    "--alias": "--model_alias",
    "-a": "--model_alias",
    "--chat-template": "--chat_format",
    "--embeddings": "--embedding",
    "--flash-attn": "--flash_attn",
    "-fa": "--flash_attn",
    "--mlock": "--use_mlock",
    "--main-gpu": "--main_gpu",
    "-mg": "--main_gpu",
    "--split-mode": "--split_mode",
    "--tensor-split": "--tensor_split",
    "--rope-freq-base": "--rope_freq_base",
    "--mmproj": "--clip_model_path",
    "--lora": "--lora_path",
}
_REVERSE = {python: server for server, python in _SAME.items() if server.startswith("--")}


def _flags(args: tuple[str, ...]) -> list[str]:
    """The option names in ``args`` (``--x=1`` gives ``--x``); negative numbers are values."""
    found = []
    for arg in args:
        if not arg.startswith("-") or arg == "-":
            continue
        try:
            float(arg)
            continue
        except ValueError:
            pass
        found.append(arg.split("=", 1)[0])
    return found


def _python_server_refuses(flag: str) -> bool:
    return not flag.startswith("--") or flag[2:] not in PYTHON_SERVER_FLAGS


def _llama_server_refuses(flag: str) -> bool:
    # llama-server's flags are all spelt with dashes; llama-cpp-python's with underscores.
    return "_" in flag


def check_engine_args(spec: ModelSpec, server: LlamaCppServer | None) -> None:
    """Refuse ``engine_args`` the chosen server would not take (None: the image's llama-server)."""
    python = server is not None and not server.is_llama_server
    for flag in _flags(spec.engine_args):
        if python and _python_server_refuses(flag):
            same = _SAME.get(flag)
            instead = f" (llama-cpp-python spells it {same})" if same else ""
            raise EngineError(
                f"{spec.name}: engine_args flag {flag} is llama-server's, but this job would "
                f"run llama-cpp-python's server, which refuses it{instead}",
                hint="build ModelTainer's own llama-server once (about 5 minutes): "
                "`python -m hpc.dev.llama_server`, put one on the PATH or set llamacpp.server "
                "in site.yaml; or write llama-cpp-python's flags (docs/llamacpp.md)",
            )
        if not python and _llama_server_refuses(flag):
            same = _REVERSE.get(flag)
            instead = f" (llama-server spells it {same})" if same else ""
            runs = "the image's llama-server" if server is None else server.describe()
            raise EngineError(
                f"{spec.name}: engine_args flag {flag} is llama-cpp-python's, but this job "
                f"runs {runs}, which refuses it{instead}",
                hint="write llama-server's flags (`llama-server --help`; docs/llamacpp.md)",
            )
