"""Engine launch commands: exact argv, the key only in the environment, hostile paths intact."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hpc.errors import EngineError
from hpc.job.engines import EngineLaunch, build_launch, gpus_granted, resolve_gguf
from hpc.llamacppserver import LlamaCppServer, cached_build
from hpc.registry import new_api_key
from hpc.spec import ModelSpec

SOCK = Path("/tmp/mt-x1y2/engine.sock")
KEY = new_api_key()
HOSTILE_NAMES = [
    "with space",
    "quote'single",
    'quote"double',
    "semi; echo pwned",
    "new\nline",
    "$(touch x) `id`",
]


def _spec(engine: str, source: str, **fields: Any) -> ModelSpec:
    data: dict[str, Any] = {"name": "test-model", "engine": engine, "weights": {"source": source}}
    return ModelSpec.model_validate(data | fields)


NETNS = [sys.executable, "-m", "hpc.job.netns", "auto", "--"]
APPTAINER_NET = ["--net", "--network", "none"]


def _own_network(launch: EngineLaunch) -> EngineLaunch:
    """``launch`` without what gives the engine a network of its own (tested below)."""
    argv = launch.argv
    if argv[:5] == NETNS:
        return replace(launch, argv=argv[5:])
    if argv[:2] == ["apptainer", "exec"]:
        at = 3 if argv[2] in ("--nv", "--rocm") else 2
        if argv[at : at + 3] == APPTAINER_NET:
            return replace(launch, argv=argv[:at] + argv[at + 3 :])
    return launch


def _launch(
    spec: ModelSpec, environ: dict[str, str] | None = None, *, raw: bool = False
) -> EngineLaunch:
    """The launch for ``spec``; unless ``raw``, without the network namespace's wrapping."""
    launch = build_launch(spec, listen=SOCK, api_key=KEY, environ=environ or {})
    # Whatever the variant: the key is in the environment, never on the command line.
    assert not any(KEY in arg for arg in launch.argv), launch.argv
    assert KEY in launch.env.values()
    assert KEY not in repr(launch)
    return launch if raw else _own_network(launch)


def _after(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, argv
    return argv[argv.index(flag) + 1]


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "gemma-3-270m-Q4_K_M.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    return path


@pytest.fixture
def llama_server_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    server = bin_dir / "llama-server"
    server.write_text("#!/bin/sh\nexit 0\n")
    server.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return server


@pytest.fixture
def no_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No llama-server on the PATH, and a home without ModelTainer's own build."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path / "no-build-home"))


# -- llama.cpp ------------------------------------------------------------------------------


def test_llamacpp_uses_llama_server_when_it_is_on_path(
    gguf: Path, llama_server_on_path: Path
) -> None:
    launch = _launch(_spec("llamacpp", str(gguf), engine_args=["--ctx-size", "4096"]))
    # The key goes through a pipe (hpc.job.keypipe), never argv: llama-server reads it from
    # --api-key-file /dev/fd/3, which keypipe fills from MT_ENGINE_KEY before it execs.
    assert launch.argv[:6] == [sys.executable, "-m", "hpc.job.keypipe", "MT_ENGINE_KEY", "3", "--"]
    assert launch.argv[6:] == [
        str(llama_server_on_path),
        "--model",
        str(gguf),
        "--host",
        str(SOCK),
        "--alias",
        "test-model",
        "--threads",
        "1",
        "--api-key-file",
        "/dev/fd/3",
        "--ctx-size",
        "4096",
    ]
    assert launch.env == {"MT_ENGINE_KEY": KEY}
    assert not any(KEY in arg for arg in launch.argv)
    assert (launch.health_path, launch.health_needs_key) == ("/health", False)


def test_llama_server_runs_as_many_threads_as_the_job_has_cpus(
    gguf: Path, llama_server_on_path: Path
) -> None:
    launch = _launch(_spec("llamacpp", str(gguf), resources={"cpus": 8}))
    assert _after(launch.argv, "--threads") == "8"
    launch = _launch(_spec("llamacpp", str(gguf), resources={"cpus": 8}, engine_args=["-t", "2"]))
    assert "--threads" not in launch.argv and launch.argv[-2:] == ["-t", "2"]


def test_llamacpp_offloads_to_gpus_unless_told_otherwise(
    gguf: Path, llama_server_on_path: Path
) -> None:
    launch = _launch(_spec("llamacpp", str(gguf), resources={"gpus": 1}))
    assert _after(launch.argv, "--n-gpu-layers") == "999"
    launch = _launch(_spec("llamacpp", str(gguf), resources={"gpus": 1}, engine_args=["-ngl=20"]))
    assert "--n-gpu-layers" not in launch.argv
    assert launch.argv[-1] == "-ngl=20"


def test_llamacpp_falls_back_to_llama_cpp_python(gguf: Path, no_llama_server: None) -> None:
    launch = _launch(_spec("llamacpp", str(gguf)))
    assert launch.argv == [
        sys.executable,
        "-m",
        "hpc.job.llamacpp_python",
        "--uds",
        str(SOCK),
        "--model",
        str(gguf),
        "--model_alias",
        "test-model",
        "--interrupt_requests",
        "False",
    ]
    assert launch.env == {"API_KEY": KEY}  # llama-cpp-python's settings read API_KEY
    assert (launch.health_path, launch.health_needs_key) == ("/v1/models", True)
    assert launch.probe_path == "/openapi.json"
    launch = _launch(_spec("llamacpp", str(gguf), resources={"gpus": 2}))
    assert _after(launch.argv, "--n_gpu_layers") == "-1"
    mine = ["--interrupt_requests", "True"]
    launch = _launch(_spec("llamacpp", str(gguf), engine_args=mine))
    assert launch.argv.count("--interrupt_requests") == 1 and launch.argv[-2:] == mine


def test_llamacpp_runs_the_server_the_plan_names(gguf: Path, no_llama_server: None) -> None:
    """The server chosen at submit (hpc.llamacppserver) is what the node runs."""
    chosen = LlamaCppServer(kind="site", path="/shared/llama.cpp/llama-server")
    spec = _spec("llamacpp", str(gguf), engine_args=["--ctx-size", "64"])
    launch = build_launch(spec, listen=SOCK, api_key=KEY, environ={}, llamacpp=chosen)
    assert "/shared/llama.cpp/llama-server" in launch.argv
    python = LlamaCppServer(kind="python")
    spec = _spec("llamacpp", str(gguf), engine_args=["--n_ctx", "64"])
    launch = build_launch(spec, listen=SOCK, api_key=KEY, environ={}, llamacpp=python)
    assert "hpc.job.llamacpp_python" in launch.argv


def test_llamacpp_without_a_choice_finds_modeltainers_own_build(
    gguf: Path, no_llama_server: None, tmp_path: Path
) -> None:
    """A plan without a choice (sbatch'd from a laptop over SSH, a pool's pod): the node looks
    in the job's own PATH, then its home's cache."""
    home = tmp_path / "node-home"
    cached = cached_build(home)
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    launch = _launch(_spec("llamacpp", str(gguf)), {"HOME": str(home)})
    assert launch.argv[6] == str(cached)


def test_llamacpp_refuses_the_other_servers_flags_on_the_node(
    gguf: Path, llama_server_on_path: Path
) -> None:
    """Checked again where the job starts: its record says why, not "unrecognized arguments"."""
    with pytest.raises(EngineError, match="flag --n_ctx is llama-cpp-python's"):
        _launch(_spec("llamacpp", str(gguf), engine_args=["--n_ctx", "64"]))


@pytest.mark.parametrize("on_host", [True, False])
def test_llamacpp_in_apptainer_runs_the_images_llama_server(
    gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_host: bool
) -> None:
    bin_dir = tmp_path / "host-bin"
    bin_dir.mkdir()
    if on_host:
        (bin_dir / "llama-server").write_text("#!/bin/sh\n")
        (bin_dir / "llama-server").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    runtime = {"kind": "apptainer", "image": "/images/llamacpp-cpu.sif"}
    launch = _launch(_spec("llamacpp", str(gguf), runtime=runtime))
    # Neither this node's llama-server nor its Python exist inside the image.
    assert launch.argv[:6] == [
        "apptainer",
        "exec",
        "--bind",
        str(SOCK.parent),
        "/images/llamacpp-cpu.sif",
        "llama-server",
    ]
    assert sys.executable not in launch.argv
    assert launch.env == {"LLAMA_API_KEY": KEY, "APPTAINERENV_LLAMA_API_KEY": KEY}


# -- vLLM -----------------------------------------------------------------------------------


def test_vllm_on_two_granted_gpus_gets_tensor_parallel_2() -> None:
    spec = _spec("vllm", "Qwen/Qwen3-Coder-30B-A3B-Instruct", resources={"gpus": 2})
    launch = _launch(spec, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert launch.argv == [
        "vllm",
        "serve",
        "Qwen/Qwen3-Coder-30B-A3B-Instruct",
        "--uds",
        str(SOCK),
        "--served-model-name",
        "test-model",
        "--tensor-parallel-size",
        "2",
    ]
    assert launch.env == {"VLLM_API_KEY": KEY, "VLLM_RPC_BASE_PATH": str(SOCK.parent)}
    assert (launch.health_path, launch.health_needs_key) == ("/health", False)


def test_vllm_believes_the_scheduler_over_the_spec() -> None:
    spec = _spec("vllm", "org/m", resources={"gpus": 4})
    launch = _launch(spec, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert _after(launch.argv, "--tensor-parallel-size") == "2"
    assert gpus_granted(spec, {"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert gpus_granted(spec, {"ROCR_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert gpus_granted(spec, {"CUDA_VISIBLE_DEVICES": ""}) == 4
    assert gpus_granted(spec, {}) == 4
    assert "--tensor-parallel-size" not in _launch(spec, {"CUDA_VISIBLE_DEVICES": "0"}).argv


@pytest.mark.parametrize(
    "engine_args",
    [["-tp", "2"], ["--tensor-parallel-size", "2"], ["--tensor-parallel-size=2"], ["-tp=2"]],
)
def test_vllm_respects_an_explicit_tensor_parallel_size(engine_args: list[str]) -> None:
    spec = _spec("vllm", "org/m", resources={"gpus": 4}, engine_args=engine_args)
    launch = _launch(spec, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert launch.argv[-len(engine_args) :] == engine_args
    assert "4" not in launch.argv
    assert sum(a.startswith(("-tp", "--tensor-parallel-size")) for a in launch.argv) == 1


def test_vllm_passes_the_revision() -> None:
    spec = _spec("vllm", "org/m")
    spec = spec.model_copy(update={"weights": spec.weights.model_copy(update={"revision": "v2"})})
    assert _after(_launch(spec).argv, "--revision") == "v2"


def test_vllm_in_apptainer_with_nv_and_binds() -> None:
    runtime = {
        "kind": "apptainer",
        "image": "/shared/containers/vllm-cuda.sif",
        "gpu_flag": "--nv",
        "binds": ["/scratch/hf:/root/.cache/huggingface", "/data"],
    }
    spec = _spec("vllm", "org/m", resources={"gpus": 2}, runtime=runtime)
    launch = _launch(spec, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert launch.argv == [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        "/scratch/hf:/root/.cache/huggingface",
        "--bind",
        "/data",
        "--bind",
        str(SOCK.parent),  # the engine's socket directory, always
        "/shared/containers/vllm-cuda.sif",
        "vllm",
        "serve",
        "org/m",
        "--uds",
        str(SOCK),
        "--served-model-name",
        "test-model",
        "--tensor-parallel-size",
        "2",
    ]
    # APPTAINERENV_X reaches the container as X even under --cleanenv.
    assert launch.env == {
        "VLLM_API_KEY": KEY,
        "VLLM_RPC_BASE_PATH": str(SOCK.parent),
        "APPTAINERENV_VLLM_API_KEY": KEY,
        "APPTAINERENV_VLLM_RPC_BASE_PATH": str(SOCK.parent),
    }


def test_rocm_flag() -> None:
    runtime = {"kind": "apptainer", "image": "/i.sif", "gpu_flag": "--rocm"}
    assert _launch(_spec("vllm", "org/m", runtime=runtime)).argv[:3] == [
        "apptainer",
        "exec",
        "--rocm",
    ]


# -- the engine's own network (hpc.job.netns) ----------------------------------------------


def test_an_engine_with_local_weights_gets_a_network_of_its_own(
    gguf: Path, llama_server_on_path: Path, tmp_path: Path
) -> None:
    launch = _launch(_spec("llamacpp", str(gguf)), raw=True)
    assert launch.argv[:5] == NETNS and launch.isolated and launch.network_note is None
    assert launch.argv[5:8] == [sys.executable, "-m", "hpc.job.keypipe"]  # then the key pipe
    strict = _launch(_spec("vllm", str(tmp_path), engine_network="isolated"), raw=True)
    assert strict.argv[:5] == [*NETNS[:3], "isolated", "--"]
    assert strict.argv[5:7] == ["vllm", "serve"]


def test_apptainer_gives_the_engine_its_none_network(tmp_path: Path) -> None:
    runtime = {"kind": "apptainer", "image": "/i.sif", "gpu_flag": "--nv"}
    launch = _launch(_spec("vllm", str(tmp_path), runtime=runtime), raw=True)
    assert launch.argv[:6] == ["apptainer", "exec", "--nv", *APPTAINER_NET]
    assert sys.executable not in launch.argv  # nothing of this node's Python in the image


def test_weights_from_a_hub_or_a_shared_network_keep_the_nodes_network(tmp_path: Path) -> None:
    hub = _launch(_spec("vllm", "org/m"), raw=True)
    assert hub.argv[:2] == ["vllm", "serve"] and not hub.isolated
    assert hub.network_note is not None and "'org/m' are no local path" in hub.network_note
    shared = _launch(_spec("vllm", str(tmp_path), engine_network="shared"), raw=True)
    assert shared.argv[:2] == ["vllm", "serve"] and shared.network_note is None
    # isolated is isolated, whatever the weights: the engine will fail to download, loudly.
    strict = _launch(_spec("vllm", "org/m", engine_network="isolated"), raw=True)
    assert strict.argv[:5] == [*NETNS[:3], "isolated", "--"]


# -- hostile paths --------------------------------------------------------------------------


@pytest.mark.parametrize("weird", HOSTILE_NAMES)
def test_hostile_paths_stay_single_argv_entries(
    tmp_path: Path, weird: str, no_llama_server: None
) -> None:
    folder = tmp_path / weird
    folder.mkdir()
    gguf = folder / f"model {weird}-Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")
    image = str(folder / f"image {weird}.sif")
    bind = f"{folder}:/models"

    launch = _launch(
        _spec("llamacpp", str(folder), weights={"source": str(folder), "quant": "Q4_K_M"})
    )
    assert _after(launch.argv, "--model") == str(gguf)

    runtime = {"kind": "apptainer", "image": image, "binds": [bind]}
    launch = _launch(_spec("vllm", str(folder), runtime=runtime, engine_args=[weird]))
    assert launch.argv[:7] == [
        "apptainer",
        "exec",
        "--bind",
        bind,
        "--bind",
        str(SOCK.parent),
        image,
    ]
    assert launch.argv[9] == str(folder)
    assert launch.argv[-1] == weird
    assert len(launch.argv) == 15


# -- resolve_gguf ---------------------------------------------------------------------------


def test_resolve_gguf_takes_a_file_as_it_is(gguf: Path) -> None:
    assert resolve_gguf(_spec("llamacpp", str(gguf), weights={"source": str(gguf)})) == str(gguf)


def test_resolve_gguf_picks_the_quant_in_a_directory(tmp_path: Path) -> None:
    for name in ["m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-q5_k_s.gguf", "README.md"]:
        (tmp_path / name).write_bytes(b"x")
    source = str(tmp_path)
    for quant, expected in [("Q8_0", "m-Q8_0.gguf"), ("Q5_K_S", "m-q5_k_s.gguf")]:
        spec = _spec("llamacpp", source, weights={"source": source, "quant": quant})
        assert resolve_gguf(spec) == str(tmp_path / expected)


def test_resolve_gguf_alone_in_a_directory_needs_no_quant(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"x")
    (tmp_path / "notes.txt").write_bytes(b"x")
    assert resolve_gguf(_spec("llamacpp", str(tmp_path))) == str(tmp_path / "only.gguf")


def test_resolve_gguf_with_two_candidates_names_the_model_and_both(tmp_path: Path) -> None:
    for name in ["m-Q4_K_M.gguf", "m-Q4_K_S.gguf"]:
        (tmp_path / name).write_bytes(b"x")
    source = str(tmp_path)
    spec = _spec(
        "llamacpp", source, name="gemma-3-270m", weights={"source": source, "quant": "Q4_K"}
    )
    with pytest.raises(EngineError) as caught:
        resolve_gguf(spec)
    assert caught.value.message.startswith("gemma-3-270m: 2 GGUF files match quant Q4_K in ")
    assert "m-Q4_K_M.gguf, m-Q4_K_S.gguf" in caught.value.message
    assert caught.value.hint is not None
    assert "weights.quant" in caught.value.hint


def test_resolve_gguf_with_no_match_lists_what_is_there(tmp_path: Path) -> None:
    (tmp_path / "m-Q8_0.gguf").write_bytes(b"x")
    source = str(tmp_path)
    spec = _spec(
        "llamacpp", source, name="gemma-3-270m", weights={"source": source, "quant": "Q2_K"}
    )
    with pytest.raises(EngineError) as caught:
        build_launch(spec, listen=SOCK, api_key=KEY, environ={})
    assert caught.value.message.startswith("gemma-3-270m: 0 GGUF files match quant Q2_K")
    assert "m-Q8_0.gguf" in caught.value.message
    assert caught.value.hint is not None


@pytest.mark.parametrize("source", ["google/gemma-3-270m-GGUF", "/no/such/model.gguf"])
def test_resolve_gguf_of_weights_not_on_this_node(source: str) -> None:
    spec = _spec("llamacpp", source, name="gemma-3-270m")
    with pytest.raises(EngineError) as caught:
        resolve_gguf(spec)
    assert caught.value.message == f"gemma-3-270m: weights {source!r} not found on this node"
    assert caught.value.hint is not None
    assert "GGUF" in caught.value.hint
