"""Rendered sbatch scripts: golden files, sorted quoted flags, hostile values that cannot inject."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from test_engines import llama_server_on_path  # noqa: F401 - the fixture

from hpc.backends.slurm import SlurmBackend
from hpc.job.plan import JobPlan, warning_drain_s
from hpc.llamacppserver import LlamaCppServer
from hpc.site import Site, SiteConfig, SlurmSite
from hpc.slurm.sbatch import render
from hpc.spec import ModelSpec

GOLDEN = Path(__file__).parent / "golden" / "sbatch"
UPDATE = os.environ.get("MT_UPDATE_GOLDEN") == "1"  # read before the env is cleaned

VLLM: dict[str, Any] = {
    "name": "Qwen3-Coder-30B-A3B",
    "engine": "vllm",
    "weights": {"source": "Qwen/Qwen3-Coder-30B-A3B-Instruct"},
    "engine_args": ["--max-model-len", "32768"],
    "resources": {"gpus": 2, "gpu_type": "a100", "cpus": 16, "mem_gb": 128, "time_limit_min": 480},
    "runtime": {
        "kind": "apptainer",
        "image": "/shared/containers/vllm-cuda.sif",
        "gpu_flag": "--nv",
        "binds": ["/scratch/hf:/root/.cache/huggingface"],
    },
    "slurm": {"partition": "gpu-a100", "account": "nlp-lab", "qos": "normal"},
}

CASES: dict[str, dict[str, Any]] = {
    "vllm_apptainer_nv": VLLM,
    "vllm_rocm": {
        **VLLM,
        "name": "Llama-3.1-8B-Instruct",
        "weights": {"source": "meta-llama/Llama-3.1-8B-Instruct"},
        "engine_args": [],
        "resources": {"gpus": 1, "gpu_type": "mi250", "cpus": 8, "mem_gb": 64},
        "runtime": {"kind": "apptainer", "image": "/shared/vllm-rocm.sif", "gpu_flag": "--rocm"},
        "slurm": {"partition": "amd", "constraint": "mi250&ib", "requeue": True},
    },
    "llamacpp_cpu": {
        "name": "gemma-3-270m",
        "engine": "llamacpp",
        "weights": {"source": "/shared/models/gemma", "quant": "Q4_K_M"},
        "engine_args": ["--ctx-size", "4096"],
        "resources": {"cpus": 4, "mem_gb": 8, "time_limit_min": 60},
        "slurm": {"partition": "cpu", "signal_grace_s": 30},
    },
    "vllm_multinode": {
        **VLLM,
        "name": "Llama-3.1-405B-Instruct",
        "weights": {"source": "meta-llama/Llama-3.1-405B-Instruct"},
        "resources": {"gpus": 8, "gpu_type": "h100", "cpus": 64, "mem_gb": 900, "nodes": 2},
        "slurm": {"partition": "gpu-h100", "extra_directives": ["--exclusive"]},
    },
}

SITE = SlurmSite(account="default-acct", modules=("cuda/12.4", "apptainer/1.3"))
# The llama.cpp server a site names (site.yaml llamacpp.server), as the Slurm backend puts it
# into the plan at submit.
SITE_SERVER = LlamaCppServer(kind="site", path="/shared/llama.cpp/bin/llama-server")
LLAMA_BIN = "/opt/llama.cpp/bin"  # what the staged golden file shows for the PATH's llama-server


@pytest.fixture
def llama_server_here(request: pytest.FixtureRequest) -> Path:
    """A llama-server on this machine's PATH, which the Slurm backend finds at submit: its
    directory (test_engines' fixture)."""
    server: Path = request.getfixturevalue("llama_server_on_path")
    return server.parent


def rendered(
    spec_data: dict[str, Any],
    *,
    log_dir: Path = Path("/home/ada/.mt/logs"),
    python: str = "/opt/mt/venv/bin/python",
    site: SlurmSite = SITE,
) -> str:
    spec = ModelSpec.model_validate(spec_data)
    plan = JobPlan(
        spec=spec,
        backend="slurm",
        nonce="0123abcd",
        registry_dir=Path("/home/ada/.mt/registry"),
        engine_host="0.0.0.0",
        drain_s=spec.drain_s,  # as the Slurm backend builds it
        warning_drain_s=warning_drain_s(spec.slurm.signal_grace_s),
        llamacpp=SITE_SERVER if spec.engine == "llamacpp" and spec.runtime.kind == "none" else None,
    )
    script, _ = render(spec, plan, site, log_dir=log_dir, python=python)
    return script


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    script = rendered(CASES[case])
    path = GOLDEN / f"{case}.sbatch"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script, encoding="utf-8")
    assert script == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_directives_sorted_and_complete() -> None:
    lines = directives(rendered(VLLM))
    flags = [line.split()[1].split("=")[0] for line in lines]
    assert flags == sorted(flags)
    assert "#SBATCH --gres=gpu:a100:2" in lines
    assert "#SBATCH --signal=B:USR1@120" in lines
    assert "#SBATCH --account=nlp-lab" in lines  # the model's own account beats the site's
    assert "#SBATCH --job-name=mt-Qwen3-Coder-30B-A3B-0123abcd" in lines


def test_site_defaults_fill_in() -> None:
    spec = {**CASES["llamacpp_cpu"], "slurm": {}}
    lines = directives(rendered(spec, site=SlurmSite(partition="batch", account="lab", qos="low")))
    assert {"#SBATCH --partition=batch", "#SBATCH --account=lab", "#SBATCH --qos=low"} <= set(lines)


def test_no_secret_in_script() -> None:
    script = rendered(VLLM)
    assert "api_key" not in script and "mtj-" not in script


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("partition", "gpu\n#SBATCH --account=evil"),
        ("account", "lab$(touch /tmp/pwned)"),
        ("qos", "normal --exclusive"),
        ("constraint", "a100\necho pwned"),
        ("extra_directives", ["--comment=x\n#SBATCH --account=evil"]),
        ("extra_directives", ["#SBATCH --account=evil"]),
    ],
)
def test_hostile_slurm_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate({**VLLM, "slurm": {field: value}})
    assert field in str(info.value)


def test_hostile_model_name_is_rejected() -> None:
    with pytest.raises(ValidationError):
        ModelSpec.model_validate({**VLLM, "name": "x\n#SBATCH --account=evil"})


HOSTILE = "a b'c\"d; echo INJECTED $(echo INJECTED) `echo INJECTED`\nMT_PLAN\necho INJECTED"


def test_hostile_values_in_the_plan_stay_data(tmp_path: Path) -> None:
    """Run the script's shell part for real: nothing injected runs, the plan arrives intact."""
    capture = tmp_path / "plan.json"
    fake_python = tmp_path / "fake python"  # a path with a space, quoted by the renderer
    fake_python.write_text(f"#!/bin/sh\ncat > '{capture}'\n", encoding="utf-8")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    spec = {
        **CASES["llamacpp_cpu"],
        "weights": {"source": f"/models/{HOSTILE}"},
        "engine_args": [HOSTILE, "--flag=$(echo INJECTED)"],
    }
    log_dir = tmp_path / "logs with 'quotes' and spaces"
    script = rendered(spec, log_dir=log_dir, python=str(fake_python), site=SlurmSite())
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert "INJECTED" not in done.stdout + done.stderr
    plan = json.loads(capture.read_text(encoding="utf-8"))
    assert plan["spec"]["weights"]["source"] == f"/models/{HOSTILE}"
    assert plan["spec"]["engine_args"] == [HOSTILE, "--flag=$(echo INJECTED)"]
    output = next(line for line in directives(script) if line.startswith("#SBATCH --output="))
    assert (
        output
        == f"#SBATCH --output='{tmp_path}/logs with '\"'\"'quotes'\"'\"' and spaces/%x-%j.log'"
    )


def _staging_site(staging: dict[str, Any]) -> Site:
    config = SiteConfig.model_validate(
        {
            "registry_dir": "/home/ada/.mt/registry",
            "log_dir": "/home/ada/.mt/logs",
            "slurm": {"account": "default-acct", "python": "/opt/mt/venv/bin/python"},
            "staging": staging,
        }
    )
    return Site(config, Path("/home/ada/.mt"))


def test_golden_staged_plan_from_the_site_default(llama_server_here: Path) -> None:
    """site.yaml's staging.stage reaches the job's plan (what the wrapper on the node reads),
    and so does the llama-server found on the PATH at submit."""
    site = _staging_site({"stage": "node-local", "dir": "/dev/shm", "max_bytes": 50_000_000_000})
    spec = ModelSpec.model_validate(CASES["llamacpp_cpu"])
    script = SlurmBackend(site).prepare(spec, nonce="0123abcd").script
    assert str(llama_server_here) in script
    script = script.replace(str(llama_server_here), LLAMA_BIN)
    path = GOLDEN / "llamacpp_staged.sbatch"
    if UPDATE:
        path.write_text(script, encoding="utf-8")
    assert script == path.read_text(encoding="utf-8"), f"regenerate with MT_UPDATE_GOLDEN=1: {path}"
    assert '"staging": {' in script and '"dir": "/dev/shm"' in script


@pytest.mark.parametrize(
    ("site_stage", "spec_stage", "staged"),
    [
        ("none", None, False),
        ("node-local", None, True),
        ("node-local", "none", False),
        ("none", "node-local", True),
    ],
)
def test_a_models_weights_stage_beats_the_sites(
    site_stage: str, spec_stage: str | None, staged: bool, llama_server_here: Path
) -> None:
    site = _staging_site({"stage": site_stage})
    weights = {**CASES["llamacpp_cpu"]["weights"], "stage": spec_stage}
    spec = ModelSpec.model_validate({**CASES["llamacpp_cpu"], "weights": weights})
    plan = SlurmBackend(site).prepare(spec, nonce="0123abcd").plan
    assert isinstance(plan, JobPlan)
    assert (plan.staging is not None) is staged
    if staged:
        assert plan.staging is not None and plan.staging.dir == "$TMPDIR"


@pytest.mark.parametrize("bad", ["relative/dir", "$HOME", "/tmp/a\nb", ""])
def test_a_staging_dir_that_is_no_absolute_path_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        SiteConfig.model_validate({"staging": {"dir": bad}})
