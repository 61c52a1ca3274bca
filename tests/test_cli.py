"""The `mt` CLI: exit codes, error and hint lines, --json output, no half-written records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpc.cli import main
from hpc.registry import Registry


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def write_models(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """\
models:
  - name: tiny
    engine: llamacpp
    weights: {source: /nonexistent/tiny.gguf}
"""


def test_bad_models_file_prints_file_line_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write_models(tmp_path, GOOD + "    resources: {gpus: -1}\n")
    code, _, err = run(capsys, "--models", str(path), "submit", "tiny")
    assert code == 1
    assert err.splitlines()[0] == (
        "error: models.yaml:5: models[0].resources.gpus: Input should be greater than or equal to 0"
    )
    assert any(line.startswith("hint: ") for line in err.splitlines())


def test_unknown_model_names_the_known_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write_models(tmp_path, GOOD)
    code, _, err = run(capsys, "--models", str(path), "submit", "nope")
    assert code == 1
    assert "no model named 'nope'" in err
    assert "hint: models in" in err and "tiny" in err


def test_unknown_backend_lists_known_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write_models(tmp_path, GOOD)
    code, _, err = run(capsys, "--models", str(path), "submit", "tiny", "--backend", "pbs")
    assert code == 1
    assert "error: unknown backend 'pbs'" in err
    hint = next(line for line in err.splitlines() if line.startswith("hint: known backends: "))
    assert {"local", "slurm"} <= set(hint.removeprefix("hint: known backends: ").split(", "))
    assert Registry(Path(os.environ["MT_HOME"]) / "registry").records() == []


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "submit")
    assert code == 2
    assert "Missing argument" in err


def test_status_json_empty(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", "--json")
    assert code == 0
    assert json.loads(out) == []


def test_cancel_unknown_job(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cancel", "nope")
    assert code == 1
    assert "error: no job 'nope' in the registry" in err
    assert "hint: `mt status`" in err


def test_failed_engine_is_reported_with_its_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A job whose weights do not exist ends failed; --wait says why and exits 1."""
    path = write_models(tmp_path, GOOD)
    code, _, err = run(capsys, "--models", str(path), "submit", "tiny", "--wait", "--timeout", "60")
    assert code == 1
    assert "is failed" in err and "not found on this node" in err
    assert "hint: full log: mt logs local-" in err
    records = Registry(Path(os.environ["MT_HOME"]) / "registry").records()
    assert [r.state for r in records] == ["failed"]


def test_models_lists_configured_models(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_models(
        tmp_path, GOOD + "static:\n  - name: shared\n    base_url: http://10.0.0.5:8000/v1\n"
    )
    code, out, _ = run(capsys, "--models", str(path), "models", "--json")
    assert code == 0
    rows = {row["name"]: row for row in json.loads(out)}
    assert rows["tiny"]["endpoints"] == []
    assert rows["shared"]["source"] == "static"


def test_logs_show_the_wrappers_account(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_models(tmp_path, GOOD)
    run(capsys, "--models", str(path), "submit", "tiny", "--wait", "--timeout", "60")
    [record] = Registry(Path(os.environ["MT_HOME"]) / "registry").records()
    code, out, _ = run(capsys, "logs", record.key)
    assert code == 0
    assert f"[mt jobwrap] record {record.key} -> failed" in out
    assert "not found on this node" in out
    code, followed, _ = run(capsys, "logs", "-f", record.job_id)  # ends: the job has exited
    assert code == 0 and followed == out
