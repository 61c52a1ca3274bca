"""Multi-node specs (hpc.job.multinode): what is refused at submit, what each node runs, and
what `mt submit --dry-run` shows. The 2-node job itself runs in test_slurm_multinode.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mtcli import mt

from hpc.errors import EngineError
from hpc.job.engines import build_launch
from hpc.job.multinode import RayLayout, active_nodes, check_nodes
from hpc.spec import ModelSpec

WIDE: dict[str, Any] = {
    "name": "wide",
    "engine": "vllm",
    "weights": {"source": "org/wide"},
    "resources": {"gpus": 8, "nodes": 2},
}

# What `ray status` prints (Ray 2.x, autoscaler summary), with two nodes joined.
RAY_STATUS = """\
======== Autoscaler status: 2026-12-05 03:40:12.345678 ========
Node status
---------------------------------------------------------------
Active:
 1 node_3f0c8a0e2b9d4c1e9f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a
 1 node_9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d
Pending:
 (no pending nodes)
Recent failures:
 (no failures)

Resources
---------------------------------------------------------------
Usage:
 0.0/16.0 GPU
"""


def spec(**changes: Any) -> ModelSpec:
    data = {**WIDE, **changes}
    data["resources"] = {**WIDE["resources"], **changes.get("resources", {})}
    return ModelSpec.model_validate(data)


@pytest.mark.parametrize(
    ("changes", "message", "hint"),
    [
        (
            {"engine": "llamacpp", "weights": {"source": "/m/x.gguf"}},
            "llama.cpp serves from one node",
            "resources.nodes: 1",
        ),
        ({"resources": {"gpus": 0}}, "with no GPUs", "GPUs of all 2 nodes"),
        ({"resources": {"gpus": 6, "nodes": 4}}, "does not split evenly over 4", "e.g. 4"),
        ({"engine_args": ["-tp", "4"]}, "engine_args set -tp", "remove them"),
        (
            {"engine_args": ["--pipeline-parallel-size=2"]},
            "set --pipeline-parallel-size",
            "remove them",
        ),
        ({"engine_network": "isolated"}, "Ray joins the nodes", "engine_network: auto"),
    ],
)
def test_what_cannot_start_on_every_node_is_refused(
    changes: dict[str, Any], message: str, hint: str
) -> None:
    with pytest.raises(EngineError) as info:
        check_nodes(spec(**changes))
    assert message in info.value.message and hint in (info.value.hint or "")


def test_one_node_is_left_alone() -> None:
    one = spec(engine="llamacpp", weights={"source": "/m/x.gguf"}, resources={"nodes": 1})
    check_nodes(one)
    assert RayLayout.of(one) is None


def test_each_node_gets_its_share_of_the_gpus() -> None:
    layout = RayLayout.of(spec(resources={"gpus": 16, "nodes": 4}))
    assert layout is not None and (layout.nodes, layout.gpus_per_node) == (4, 4)
    assert layout.vllm_args() == [
        "--tensor-parallel-size",
        "4",
        "--pipeline-parallel-size",
        "4",
        "--distributed-executor-backend",
        "ray",
    ]
    step = layout.workers_step_argv("10.0.0.5", 41234)
    assert step[: step.index("ray")] == [
        "srun",
        "--nodes=3",
        "--ntasks=3",
        "--ntasks-per-node=1",
        "--relative=1",
        "--kill-on-bad-exit=1",
        "--job-name=mt-ray-workers",
        "--gres=gpu:4",
    ]
    assert "--address=10.0.0.5:41234" in step
    head = layout.head_argv("10.0.0.5", 41234)
    assert "--node-ip-address=10.0.0.5" in head and "--port=41234" in head
    assert "--include-dashboard=false" in head


def test_ray_runs_in_the_models_image() -> None:
    runtime = {"kind": "apptainer", "image": "/c/vllm.sif", "gpu_flag": "--nv", "binds": ["/s:/s"]}
    layout = RayLayout.of(spec(runtime=runtime))
    assert layout is not None
    prefix = ["apptainer", "exec", "--nv", "--bind", "/s:/s", "/c/vllm.sif", "ray"]
    assert layout.head_argv("a", 1)[:7] == prefix
    assert layout.status_argv("a", 1) == [*prefix, "status", "--address=a:1"]
    worker = layout.workers_step_argv("a", 1)
    assert worker[worker.index("apptainer") :][:7] == prefix


def test_the_token_is_only_in_the_environment() -> None:
    env = RayLayout.env("10.0.0.5", 41234, "s3cret-token")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "s3cret-token"
    assert env["RAY_ADDRESS"] == "10.0.0.5:41234"
    layout = RayLayout.of(spec())
    assert layout is not None
    for argv in (layout.head_argv("h", 1), layout.workers_step_argv("h", 1)):
        assert not any("s3cret" in a or "TOKEN" in a for a in argv)


def test_ray_status_counts_active_nodes_only() -> None:
    assert active_nodes(RAY_STATUS) == 2
    pending = RAY_STATUS.replace(" (no pending nodes)", " 1 node_pending0")
    assert active_nodes(pending) == 2
    assert active_nodes("Active:\n (no active nodes)\nPending:\n") == 0
    assert active_nodes("") == 0


def test_vllm_spans_the_nodes_on_the_nodes_network(tmp_path: Path) -> None:
    launch = build_launch(
        spec(), listen=tmp_path / "e.sock", api_key="k", environ={"CUDA_VISIBLE_DEVICES": "0,1"}
    )
    argv = launch.argv
    # Tensor parallel is the GPUs per node from the spec, not this node's CUDA_VISIBLE_DEVICES.
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "2"
    assert not launch.isolated and launch.network_note is not None
    assert "Ray joins them" in launch.network_note


def _models(tmp_path: Path, **changes: Any) -> Path:
    data = {**WIDE, **changes}
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {json.dumps(data)}\n", encoding="utf-8")
    return path


def test_dry_run_shows_each_nodes_command(tmp_path: Path) -> None:
    models = _models(tmp_path)
    script = mt("--models", str(models), "submit", "wide", "--backend", "slurm", "--dry-run").stdout
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gres=gpu:4" in script
    assert "#   ray start --head --block --node-ip-address=<head address>" in script
    assert "#   srun --nodes=1 --ntasks=1 --ntasks-per-node=1 --relative=1" in script
    assert "--pipeline-parallel-size 2 --distributed-executor-backend ray" in script


def test_submit_refuses_a_multinode_llamacpp_with_the_reason(tmp_path: Path) -> None:
    models = _models(tmp_path, engine="llamacpp", weights={"source": str(tmp_path / "m.gguf")})
    done = mt(
        "--models", str(models), "submit", "wide", "--backend", "slurm", "--dry-run", check=False
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "error: wide: resources.nodes=2: llama.cpp serves from one node" in done.stderr
    assert "hint: set resources.nodes: 1" in done.stderr


def test_the_local_backend_refuses_several_nodes(tmp_path: Path) -> None:
    models = _models(tmp_path)
    done = mt("--models", str(models), "submit", "wide", "--backend", "local", check=False)
    assert done.returncode == 1
    assert "error: wide: resources.nodes=2: the local backend runs a model on this one machine" in (
        done.stderr
    )
    assert "hint: submit it with --backend slurm" in done.stderr


def test_ray_is_never_started_outside_a_slurm_allocation(tmp_path: Path) -> None:
    """srun outside an allocation would ask Slurm for a new one: the wrapper refuses first."""
    from hpc.job.raycluster import RayCluster

    layout = RayLayout.of(spec())
    assert layout is not None
    said: list[str] = []
    cluster = RayCluster(layout, {"PATH": str(tmp_path)}, said.append, address="127.0.0.1")
    outcome, why = cluster.join(deadline=0.0, stopped=lambda: False)
    assert outcome == "exited" and "inside a Slurm allocation" in why
    assert said == []  # nothing was started


def test_a_swap_pool_over_several_nodes_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    pool = {"name": "wide-pool", "models": ["wide"], "resources": {"gpus": 4, "nodes": 2}}
    models.write_text(f"models:\n  - {json.dumps(WIDE)}\npools:\n  - {json.dumps(pool)}\n")
    done = mt(
        "--models",
        str(models),
        "submit",
        "wide-pool",
        "--backend",
        "slurm",
        "--dry-run",
        check=False,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert "error: wide-pool: resources.nodes=2: a swap pool loads its models on one node" in (
        done.stderr
    )
    assert "hint: set the pool's resources.nodes: 1" in done.stderr
