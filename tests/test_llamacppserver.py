"""Which llama.cpp server `engine: llamacpp` runs (hpc.llamacppserver), and the flag check.

The order: the image's llama-server > site.yaml's llamacpp.server > `llama-server` on the
PATH > ModelTainer's own build under ~/.cache/modeltainer > llama-cpp-python's server. A
spec whose engine_args belong to the other server fails at submit, naming the flag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hpc.errors import EngineError
from hpc.llamacppserver import (
    PYTHON_SERVER_FLAGS,
    LlamaCppServer,
    cached_build,
    check_engine_args,
    describe,
    host_server,
    server_for,
    server_for_pool,
)
from hpc.site import SiteConfig
from hpc.spec import ModelSpec, PoolSpec

PYTHON = LlamaCppServer(kind="python")


def _spec(*engine_args: str, **fields: Any) -> ModelSpec:
    data: dict[str, Any] = {
        "name": "gemma",
        "engine": "llamacpp",
        "weights": {"source": "/models/gemma.gguf"},
        "engine_args": list(engine_args),
    }
    return ModelSpec.model_validate(data | fields)


def _binary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A site binary, a PATH directory and a home, each empty until a test fills it."""
    return {
        "site": tmp_path / "site" / "llama-server",
        "path": tmp_path / "bin",
        "home": tmp_path / "home",
    }


def _env(places: dict[str, Path]) -> dict[str, str]:
    places["path"].mkdir(exist_ok=True)
    return {"PATH": str(places["path"]), "HOME": str(places["home"])}


def test_the_order_site_then_path_then_own_build_then_python(places: dict[str, Path]) -> None:
    env = _env(places)
    assert host_server(None, env) == PYTHON
    cached = _binary(cached_build(places["home"]))
    assert cached == places["home"] / ".cache/modeltainer/llama-server-0.3.36-avx2/llama-server"
    assert host_server(None, env) == LlamaCppServer(kind="cache", path=str(cached))
    on_path = _binary(places["path"] / "llama-server")
    assert host_server(None, env) == LlamaCppServer(kind="path", path=str(on_path))
    site = _binary(places["site"])
    assert host_server(site, env) == LlamaCppServer(kind="site", path=str(site))


def test_a_site_server_that_is_not_there_is_refused(places: dict[str, Path]) -> None:
    with pytest.raises(EngineError) as caught:
        host_server(places["site"], _env(places))
    assert "llamacpp.server" in caught.value.message and str(places["site"]) in caught.value.message
    assert caught.value.hint and "site.yaml" in caught.value.hint


def test_the_site_setting_is_read_from_site_yaml() -> None:
    config = SiteConfig.model_validate({"llamacpp": {"server": "/opt/llama/bin/llama-server"}})
    assert config.llamacpp.server == Path("/opt/llama/bin/llama-server")
    with pytest.raises(ValueError, match="servr"):
        SiteConfig.model_validate({"llamacpp": {"servr": "/x"}})


def test_llama_server_flags_fail_on_the_python_server_naming_the_flag() -> None:
    for args, flag, same in [
        (("--ctx-size", "4096"), "--ctx-size", "--n_ctx"),
        (("-c", "4096"), "-c", "--n_ctx"),
        (("--metrics",), "--metrics", None),
        (("-ngl=20",), "-ngl", "--n_gpu_layers"),
    ]:
        with pytest.raises(EngineError) as caught:
            check_engine_args(_spec(*args), PYTHON)
        message = caught.value.message
        assert f"flag {flag} is llama-server's" in message, message
        assert (f"spells it {same}" in message) == (same is not None), message
        assert caught.value.hint and "python -m hpc.dev.llama_server" in caught.value.hint
    # Its own flags, and negative numbers as values, pass.
    check_engine_args(
        _spec("--n_ctx", "2048", "--n_gpu_layers", "-1", "--chat_format=gemma"), PYTHON
    )


def test_python_server_flags_fail_on_llama_server_naming_the_flag() -> None:
    server = LlamaCppServer(kind="path", path="/usr/bin/llama-server")
    with pytest.raises(EngineError) as caught:
        check_engine_args(_spec("--n_ctx", "2048"), server)
    message = caught.value.message
    assert "flag --n_ctx is llama-cpp-python's" in message and "/usr/bin/llama-server" in message
    assert "spells it --ctx-size" in message
    assert caught.value.hint and "llama-server --help" in caught.value.hint
    # In a container: the image's llama-server.
    with pytest.raises(EngineError, match="the image's llama-server"):
        check_engine_args(_spec("--chat_format", "gemma"), None)
    check_engine_args(_spec("--ctx-size", "4096", "-ngl", "-1", "--metrics", "--jinja"), server)


def test_the_python_servers_flags_are_llama_cpp_pythons_own() -> None:
    """The list the check uses is the installed llama-cpp-python's settings (0.3.36)."""
    settings = pytest.importorskip("llama_cpp.server.settings")
    fields = set(settings.ModelSettings.model_fields) | set(settings.ServerSettings.model_fields)
    assert fields | {"config_file"} == PYTHON_SERVER_FLAGS


def test_server_for_checks_every_model_and_skips_containers(places: dict[str, Path]) -> None:
    env = _env(places)
    assert server_for([_spec("--n_ctx", "64")], None, env) == PYTHON
    with pytest.raises(EngineError, match="--ctx-size"):
        server_for([_spec("--n_ctx", "64"), _spec("--ctx-size", "64")], None, env)
    image = {"runtime": {"kind": "apptainer", "image": "/img/llama.sif"}}
    assert server_for([_spec("--ctx-size", "64", **image)], None, env) is None
    with pytest.raises(EngineError, match="the image's llama-server"):
        server_for([_spec("--n_ctx", "64", **image)], None, env)
    vllm = ModelSpec.model_validate(
        {"name": "v", "engine": "vllm", "weights": {"source": "org/m"}, "engine_args": ["--x_y"]}
    )
    assert server_for([vllm], None, env) is None


def test_not_here_only_the_site_setting_is_taken(places: dict[str, Path]) -> None:
    """Slurm over SSH: this machine's PATH and home say nothing about the cluster's nodes."""
    env = _env(places)
    _binary(places["path"] / "llama-server")
    assert server_for([_spec()], None, env, here=False) is None
    remote = Path("/cluster/bin/llama-server")  # not on this machine: taken on trust
    chosen = server_for([_spec()], remote, env, here=False)
    assert chosen == LlamaCppServer(kind="site", path=str(remote))


def test_a_pools_runtime_puts_its_models_in_the_image(places: dict[str, Path]) -> None:
    env = _env(places)
    catalogue = [_spec("--ctx-size", "64")]
    pool = PoolSpec.model_validate(
        {"name": "p", "models": ["gemma"], "runtime": {"kind": "apptainer", "image": "/i.sif"}}
    )
    assert server_for_pool(pool, catalogue, None, env) is None  # no host server needed
    bare = PoolSpec.model_validate({"name": "p", "models": ["gemma"]})
    with pytest.raises(EngineError, match="--ctx-size"):
        server_for_pool(bare, catalogue, None, env)  # python server here: the flag fails


def test_describe_says_which_server() -> None:
    image = _spec(runtime={"kind": "apptainer", "image": "/img/llama.sif"})
    assert describe(image, None) == "the image's llama-server (/img/llama.sif)"
    assert "chosen on the node" in describe(_spec(), None)
    cached = LlamaCppServer(kind="cache", path="/h/llama-server")
    assert describe(_spec(), cached) == "ModelTainer's own llama-server build (/h/llama-server)"
    assert "llama-cpp-python" in describe(_spec(), PYTHON)


def test_the_build_command_says_what_it_runs_and_skips_a_built_binary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m hpc.dev.llama_server` (what `make llama-server` runs): its steps and flags;
    a binary already there is kept (the build itself takes 5 minutes: `make test` runs it)."""
    from hpc.dev import llama_server

    target = tmp_path / "llama-server"
    assert llama_server.main(["--print", "--out", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36" in printed
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DLLAMA_USE_PREBUILT_UI=OFF"):
        assert flag in printed
    assert "--target llama-server" in printed and str(target) in printed
    assert not target.exists()
    _binary(target)
    assert llama_server.main(["--out", str(target)]) == 0
    assert capsys.readouterr().out == f"{target}\n"
