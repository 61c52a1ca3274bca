"""hpc/dev/without_cuda.py: the list `make openwebui` installs with --no-deps from pip's
resolved report, without the CUDA stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpc.dev.without_cuda import dropped, requirements


def _report(*names: str) -> dict[str, object]:
    return {"install": [{"metadata": {"name": n, "version": "1.0"}} for n in names]}


def test_the_cuda_stack_is_left_out_and_the_rest_pinned() -> None:
    report = _report(
        "open-webui", "torch", "Triton", "nvidia-cublas-cu12", "cuda-bindings", "transformers"
    )
    assert requirements(report) == ["open-webui==1.0", "transformers==1.0"]
    assert not dropped("torchvision-extra") and not dropped("pytorch-lightning")


def test_run_as_a_script_on_a_report_file(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report("fastapi", "nvidia-nccl-cu12")), encoding="utf-8")
    script = Path(__file__).resolve().parent.parent / "hpc" / "dev" / "without_cuda.py"
    done = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["fastapi==1.0"]
