"""The chaos soak, short: `python -m bench.chaos` for two minutes on the local backend and the
session's private Slurm cluster, with the real Gemma model and real faults (SIGKILL and
SIGSTOP of engines, SIGKILL of wrappers, gateway restarts, `scontrol requeue`, a full
registry disk, a dropped `mt tunnel` link through a real sshd). Its report must show whole
answers and nothing hung, lost, doubled, leaked or left behind. The 60-minute run's numbers
are in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from slurmcluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.llamacpp, pytest.mark.timeout(900)]


def test_short_soak_loses_nothing(gemma_gguf: Path, cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.chaos",
            *("--minutes", "2", "--backends", "local,slurm"),
            *("--fault-interval", "8", "--hold", "5", "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert out.is_file(), done.stderr[-3000:]
    report = json.loads(out.read_text())
    for backend, world in report["worlds"].items():
        requests, tunnelled = world["requests"], world["requests_via_tunnel"]
        assert requests["whole"] > 10, (backend, requests)
        assert requests["hung"] == requests["lost"] == requests["cut"] == 0, (backend, requests)
        assert tunnelled["whole"] > 0, (backend, tunnelled)
        assert tunnelled["hung"] == tunnelled["lost"] == 0, (backend, tunnelled)
        assert world["duplicate_jobs"] == 0, (backend, world["duplicate_examples"])
        assert world["records_unfinished"] == [], backend
        assert world["keys_in_argv"] == [] and world["keys_in_logs"] == [], backend
        # The faults really happened: at least one engine kill and a gateway restart.
        assert world["faults"]["done"].get("engine-kill", 0) >= 1, (backend, world["fault_log"])
        assert world["faults"]["done"].get("gateway-restart", 0) >= 1, backend
    assert report["processes_left"] == [] and report["keys_in_argv_at_end"] == []
    assert report["ok"] and done.returncode == 0, done.stderr[-3000:]
