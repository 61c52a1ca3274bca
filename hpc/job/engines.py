"""How each engine is started: argv, environment, health; the key never in argv.

The key reaches vLLM and llama-cpp-python through their environment (``VLLM_API_KEY``,
``API_KEY``: /proc/PID/environ is readable by the same user and root only), and
llama-server through ``--api-key-file /dev/fd/3``, a pipe hpc.job.keypipe fills from the
environment just before it ``exec``s the server (no key file on disk, nothing left behind).

A pure function of the spec and the place it runs, so the job wrapper under every backend
starts an engine the same way and tests can read the exact command. Every engine listens
on a Unix socket (``listen``) in the job's 0700 directory, never on a TCP port: the job's
front (hpc.job.front) is what the node's network reaches. vLLM takes ``--uds``,
llama-server a ``--host`` ending in ``.sock``, llama-cpp-python's server runs under
hpc.job.llamacpp_python, which gives it one.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from hpc.errors import EngineError
from hpc.job.keypipe import ENV as KEYPIPE_ENV
from hpc.job.keypipe import key_path, keypipe_argv
from hpc.job.multinode import RayLayout
from hpc.job.netns import netns_argv
from hpc.llamacppserver import LlamaCppServer, check_engine_args, host_server
from hpc.spec import ModelSpec


@dataclass(frozen=True)
class EngineLaunch:
    """One engine process: what to run, what to add to its environment, how to probe it."""

    argv: list[str]
    env: dict[str, str] = field(repr=False)
    health_path: str
    health_needs_key: bool
    # Where the gateway probes a running engine, if not ``health_path``: a path that does
    # not wait behind a generation in progress.
    probe_path: str | None = None
    # Whether the engine runs in a network namespace of its own (hpc.job.netns), and if
    # not although it could have, why (the wrapper writes it into the job's log).
    isolated: bool = False
    network_note: str | None = None


def resolve_gguf(spec: ModelSpec) -> str:
    """The GGUF file to serve: the path itself, or the one file in a directory matching quant.

    The quant filter ignores case: hubs publish both ``…-Q4_K_M.gguf`` and ``…-q4_k_m.gguf``.
    """
    source = Path(spec.weights.source).expanduser()
    if source.is_file():
        return str(source)
    if source.is_dir():
        quant = spec.weights.quant
        ggufs = sorted(p for p in source.iterdir() if p.suffix.lower() == ".gguf")
        found = [p for p in ggufs if quant is None or quant.lower() in p.name.lower()]
        if len(found) == 1:
            return str(found[0])
        wanted = f"quant {quant}" if quant else "*.gguf"
        names = ", ".join(p.name for p in (found or ggufs)) or "none"
        raise EngineError(
            f"{spec.name}: {len(found)} GGUF files match {wanted} in {source} (found: {names})",
            hint="set weights.quant (e.g. Q4_K_M) so exactly one GGUF file matches",
        )
    raise EngineError(
        f"{spec.name}: weights {spec.weights.source!r} not found on this node",
        hint="llama.cpp needs a local GGUF path; download it to shared storage first",
    )


def _has_flag(args: tuple[str, ...], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _llamacpp(
    spec: ModelSpec,
    listen: Path,
    api_key: str,
    chosen: LlamaCppServer | None,
    environ: Mapping[str, str],
) -> EngineLaunch:
    gguf = resolve_gguf(spec)
    # In a container the server is the image's own, found on the image's PATH; this node's
    # PATH and Python say nothing about what the image holds. Outside one: the server the
    # plan names (chosen at submit, hpc.llamacppserver), else the first found here.
    in_image = spec.runtime.kind != "none"
    server = None if in_image else (chosen or host_server(None, environ))
    check_engine_args(spec, server)
    binary = "llama-server" if server is None else server.path
    if binary is not None:
        argv = [binary, "--model", gguf, "--host", str(listen), "--alias", spec.name]
        if not _has_flag(spec.engine_args, "-t", "--threads"):
            # The CPUs the job asked for (Slurm's --cpus-per-task), not every core of the
            # node: its threads spin, and more of them than cores slows every one down.
            argv += ["--threads", str(spec.resources.cpus)]
        if spec.resources.gpus and not _has_flag(
            spec.engine_args, "-ngl", "--n-gpu-layers", "--gpu-layers"
        ):
            argv += ["--n-gpu-layers", "999"]
        if in_image:
            # Apptainer's passing of descriptors into the image is not something we can
            # rely on everywhere: the environment (APPTAINERENV_…), like vLLM's key.
            return EngineLaunch(
                argv=[*argv, *spec.engine_args],
                env={"LLAMA_API_KEY": api_key},
                health_path="/health",
                health_needs_key=False,
            )
        argv += ["--api-key-file", key_path()]
        return EngineLaunch(
            argv=keypipe_argv(sys.executable, [*argv, *spec.engine_args]),
            env={KEYPIPE_ENV: api_key},
            health_path="/health",
            health_needs_key=False,
        )
    # llama-cpp-python's server reads its settings from the environment (pydantic-settings),
    # which is how the key reaches it without appearing in argv.
    argv = [sys.executable, "-m", "hpc.job.llamacpp_python", "--uds", str(listen)]
    argv += ["--model", gguf, "--model_alias", spec.name]
    if spec.resources.gpus and not _has_flag(spec.engine_args, "--n_gpu_layers"):
        argv += ["--n_gpu_layers", "-1"]
    if not _has_flag(spec.engine_args, "--interrupt_requests"):
        # By default this server ends a running stream (with [DONE], mid-answer) whenever
        # another request arrives, health probes included: behind a gateway, requests queue.
        argv += ["--interrupt_requests", "False"]
    return EngineLaunch(
        argv=[*argv, *spec.engine_args],
        env={"API_KEY": api_key},
        # /v1/models answers once the model is loaded, but takes the model's lock: the
        # gateway's periodic probes use FastAPI's /openapi.json, which never waits on it.
        health_path="/v1/models",
        health_needs_key=True,
        probe_path="/openapi.json",
    )


def _vllm(spec: ModelSpec, listen: Path, api_key: str, gpus_granted: int) -> EngineLaunch:
    argv = ["vllm", "serve", spec.weights.source, "--uds", str(listen)]
    argv += ["--served-model-name", spec.name]
    if spec.weights.revision:
        argv += ["--revision", spec.weights.revision]
    layout = RayLayout.of(spec)
    if layout is not None:  # over every node of the job: Ray (hpc.job.multinode)
        argv += layout.vllm_args()
    elif gpus_granted > 1 and not _has_flag(spec.engine_args, "--tensor-parallel-size", "-tp"):
        argv += ["--tensor-parallel-size", str(gpus_granted)]
    return EngineLaunch(
        argv=[*argv, *spec.engine_args],
        # VLLM_RPC_BASE_PATH: vLLM's ZMQ sockets between its processes go into the job's
        # 0700 directory (removed at exit), not /tmp.
        env={"VLLM_API_KEY": api_key, "VLLM_RPC_BASE_PATH": str(listen.parent)},
        health_path="/health",
        health_needs_key=False,
    )


def gpus_granted(spec: ModelSpec, environ: Mapping[str, str]) -> int:
    """GPUs the scheduler gave this job (CUDA_VISIBLE_DEVICES), else what the spec asked for."""
    visible = environ.get("CUDA_VISIBLE_DEVICES") or environ.get("ROCR_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return spec.resources.gpus


def _network_reason(spec: ModelSpec) -> str | None:
    """Why the engine must share the node's network, or None if it can have its own."""
    if spec.engine_network == "shared":
        return None
    if spec.resources.nodes > 1:
        return f"{spec.resources.nodes} nodes: Ray joins them over the node's network"
    if spec.engine_network == "auto" and not Path(spec.weights.source).expanduser().exists():
        return (
            f"weights {spec.weights.source!r} are no local path: the engine may download "
            "them, so it runs on the node's network (its internal ports on the node's "
            "loopback); stage the weights and it gets a network of its own"
        )
    return None


def _isolated(spec: ModelSpec, launch: EngineLaunch) -> EngineLaunch:
    """``launch`` in a network namespace of its own, where the spec and weights allow."""
    note = _network_reason(spec)
    if spec.engine_network == "shared" or note is not None:
        return replace(launch, network_note=note)
    if spec.runtime.kind != "none":
        return replace(launch, isolated=True)  # Apptainer's own --net (_in_container)
    mode: Literal["isolated", "auto"] = "isolated" if spec.engine_network == "isolated" else "auto"
    return replace(launch, argv=netns_argv(sys.executable, mode, launch.argv), isolated=True)


def _in_container(spec: ModelSpec, launch: EngineLaunch, listen: Path) -> EngineLaunch:
    runtime = spec.runtime
    if runtime.kind == "none":
        return launch
    argv = ["apptainer", "exec"]
    if runtime.gpu_flag:
        argv.append(runtime.gpu_flag)
    if launch.isolated:
        # A network namespace with only a loopback, which Apptainer gives unprivileged
        # users (the `none` network needs no CNI plugin and no setuid).
        argv += ["--net", "--network", "none"]
    for bind in runtime.binds:
        argv += ["--bind", bind]
    # The engine's socket directory, whatever the site's `mount tmp` says.
    argv += ["--bind", str(listen.parent)]
    if runtime.image is None:  # the spec's validator rules this out; say so if it did not
        raise EngineError(f"{spec.name}: runtime.kind {runtime.kind!r} needs an image")
    # APPTAINERENV_X reaches the container as X even under --cleanenv.
    env = {**launch.env, **{f"APPTAINERENV_{k}": v for k, v in launch.env.items()}}
    return replace(launch, argv=[*argv, runtime.image, *launch.argv], env=env)


def build_launch(
    spec: ModelSpec,
    *,
    listen: Path,
    api_key: str,
    environ: Mapping[str, str],
    llamacpp: LlamaCppServer | None = None,
) -> EngineLaunch:
    """The engine command for ``spec`` listening on the Unix socket ``listen`` and requiring
    ``api_key`` (the engine's own key: the front's callers never see it).

    ``llamacpp``: the llama.cpp server the job's plan names (chosen at submit); None: the
    first found in ``environ``'s PATH and HOME (hpc.llamacppserver).
    """
    if spec.engine == "llamacpp":
        launch = _llamacpp(spec, listen, api_key, llamacpp, environ)
    else:
        launch = _vllm(spec, listen, api_key, gpus_granted(spec, environ))
    return _in_container(spec, _isolated(spec, launch), listen)
