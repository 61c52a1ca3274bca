"""`python -m bench.front_cost` runs end to end on real llama.cpp and prints its table.

The numbers themselves are measured on a quiet machine (docs/benchmarks.md); here one tiny
round checks that both paths answer (the engine's socket, and the front with its pinned
certificate and the job's key) and that the table reports a ratio for each level.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


def test_front_cost_measures_both_paths(gemma_gguf: Path) -> None:
    argv = [sys.executable, "-m", "bench.front_cost", "--gguf", str(gemma_gguf)]
    argv += ["--rounds", "1", "--requests", "2", "--levels", "1,2", "--max-tokens", "8"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", done.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"], done.stdout
    for _, direct, front, ratio in rows:
        assert float(direct) > 0 and float(front) > 0
        assert float(ratio) == pytest.approx(float(front) / float(direct), abs=0.01)
    assert "Traceback" not in done.stderr
