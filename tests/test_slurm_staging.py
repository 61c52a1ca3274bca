"""Node-local weight staging and start-up phases on the private Slurm cluster (issue 20, item 2).

Real parts throughout: the session's Slurm cluster (tests/slurmcluster.py), the real Gemma
GGUF served by llama-cpp-python's server behind the job's front, the real `mt` CLI. Two jobs
in a row on the same node (``--nodelist=gpu1``): the first copies the GGUF into the node's
cache, the second finds it there and copies 0 bytes; both engines read the staged copy;
``mt status --phases`` shows the phases (text and JSON). Two jobs submitted at once copy
once. A job Slurm keeps pending shows its time queued so far with squeue's reason. The
numbers are printed for docs/benchmarks.md ("Node-local staging").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mtcli import GEMMA, mt
from slurmcluster import SlurmCluster

from hpc.job.staging import cache_root

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(420)]


def _models_yaml(path: Path, gguf: Path) -> Path:
    path.write_text(
        "models:\n"
        f"  - name: {GEMMA}\n"
        "    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}, stage: node-local}}\n"
        '    engine_args: ["--ctx-size", "1024"]\n'
        "    startup_timeout_s: 120\n"
        "    resources: {cpus: 1, mem_gb: 1, time_limit_min: 30}\n"
        '    slurm: {extra_directives: ["--nodelist=gpu1"]}\n',
        encoding="utf-8",
    )
    return path


def _run_job() -> tuple[dict[str, object], str]:
    """Submit, wait for ready, read its phases (`mt status --phases --json`), cancel.
    Returns its phases row and the `mt status --phases` text shown while it served."""
    out = mt("submit", GEMMA, "--backend", "slurm", "--wait", "--json", "--timeout", "240")
    submitted = json.loads(out.stdout)
    key = str(submitted["key"])
    try:
        assert submitted["state"] == "ready", submitted
        rows = json.loads(mt("status", "--phases", "--json").stdout)
        text = mt("status", "--phases").stdout
    finally:
        mt("cancel", key, check=False)
    [row] = [r for r in rows if r["key"] == key]
    return row, text


def _site_yaml(node_local: Path) -> None:
    home = Path(os.environ["MT_HOME"])
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "site.yaml").write_text(
        f"staging: {{dir: {json.dumps(str(node_local))}, max_bytes: 1000000000}}\n",
        encoding="utf-8",
    )


def test_a_second_job_on_the_node_copies_nothing(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    monkeypatch.setenv("COLUMNS", "200")
    node_local = tmp_path / "node-local"
    _site_yaml(node_local)
    home = Path(os.environ["MT_HOME"])
    size = gemma_gguf.stat().st_size

    first, first_text = _run_job()
    second, second_text = _run_job()

    one, two = first["phases"], second["phases"]
    assert isinstance(one, dict) and isinstance(two, dict)
    assert one["staging_bytes"] == size and two["staging_bytes"] == 0
    assert one["staging_note"] is None and two["staging_note"] is None
    staged = Path(str(one["staged_path"]))
    assert two["staged_path"] == str(staged)
    assert staged.is_relative_to(cache_root(str(node_local), {}))
    assert staged.stat().st_size == size and staged.name == gemma_gguf.name
    for phases in (one, two):
        assert phases["engine_start_to_healthy_s"] is not None
        assert phases["queued_s"] is not None
    # The engines read the staged copy: each job's log names it in the engine's argv.
    logs = sorted((home / "logs").glob("*.log"))
    assert len(logs) == 2
    for log in logs:
        started = [line for line in log.read_text().splitlines() if "starting engine" in line]
        assert started and str(staged) in started[0], started
    said = [line for log in logs for line in log.read_text().splitlines() if "staging: " in line]
    assert len([line for line in said if f"staging: copied {size} bytes" in line]) == 1
    assert len([line for line in said if "staging: reusing" in line]) == 1
    # The text view, while each job served (rich wraps cells to the terminal's width).
    first_text, second_text = (" ".join(t.split()) for t in (first_text, second_text))
    assert f"({size / 1e6:.1f} MB, " in first_text and " MB/s)" in first_text
    assert "(reused, 0 B copied)" in second_text
    print(
        f"\nstaging numbers: {size} bytes; first job staging_s={one['staging_s']} "
        f"({one['staging_mb_s']} MB/s), engine_start_to_healthy_s="
        f"{one['engine_start_to_healthy_s']}, queued_s={one['queued_s']}; second job "
        f"staging_s={two['staging_s']} ({two['staging_bytes']} bytes), "
        f"engine_start_to_healthy_s={two['engine_start_to_healthy_s']}, "
        f"queued_s={two['queued_s']}"
    )


def test_two_jobs_at_once_on_the_node_copy_once(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    node_local = tmp_path / "node local; echo x"  # a hostile cache path: spaces, a semicolon
    _site_yaml(node_local)
    argv = [sys.executable, "-m", "hpc.cli", "submit", GEMMA, "--backend", "slurm"]
    argv += ["--wait", "--json", "--timeout", "240"]
    submits = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    keys = []
    try:
        for proc in submits:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            submitted = json.loads(out)
            keys.append(str(submitted["key"]))
            assert submitted["state"] == "ready", submitted
        rows = json.loads(mt("status", "--phases", "--json").stdout)
    finally:
        for key in keys:
            mt("cancel", key, check=False)
    phases = [r["phases"] for r in rows if r["key"] in keys]
    size = gemma_gguf.stat().st_size
    assert sorted(p["staging_bytes"] for p in phases) == [0, size]
    assert len({p["staged_path"] for p in phases}) == 1
    [entry] = (cache_root(str(node_local), {}) / "entries").iterdir()
    assert Path(phases[0]["staged_path"]).parent == entry


def test_a_queued_job_shows_its_time_so_far_and_slurms_reason(
    cluster: SlurmCluster, gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = _models_yaml(tmp_path / "models.yaml", gemma_gguf)
    text = models.read_text(encoding="utf-8").replace(
        '["--nodelist=gpu1"]', '["--nodelist=gpu1", "--begin=now+3600"]'
    )
    models.write_text(text, encoding="utf-8")
    monkeypatch.setenv("MT_MODELS", str(models))
    monkeypatch.setenv("COLUMNS", "200")
    key = str(json.loads(mt("submit", GEMMA, "--backend", "slurm", "--json").stdout)["key"])
    try:
        rows = json.loads(mt("status", "--phases", "--json").stdout)
        shown = " ".join(mt("status", "--phases").stdout.split())
    finally:
        mt("cancel", key, check=False)
    [row] = [r for r in rows if r["key"] == key]
    assert row["state"] == "pending" and row["pending_reason"] == "BeginTime"
    assert row["queued_s"] is not None and row["phases"] is None
    assert "so far (BeginTime)" in shown
