"""The engine flags a chat model needs for tool calls, and `mt submit`'s warning without them."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import run, write_models

from hpc.spec import ModelSpec
from hpc.toolcalls import missing_tool_flags, serves_chat


def spec(engine: str, *args: str) -> ModelSpec:
    return ModelSpec.model_validate(
        {"name": "m", "engine": engine, "weights": {"source": "o/m"}, "engine_args": args}
    )


@pytest.mark.parametrize(
    ("engine", "args"),
    [
        ("vllm", ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")),
        ("vllm", ("--enable-auto-tool-choice", "--tool-call-parser=llama3_json")),
        ("vllm", ("--task", "embed")),  # no chat: nothing to warn about
        ("vllm", ("--runner", "pooling")),
        ("llamacpp", ("--jinja", "--ctx-size", "4096")),
        ("llamacpp", ("--chat_format", "chatml-function-calling")),
        ("llamacpp", ("--embeddings",)),
    ],
)
def test_specs_ready_for_tools_or_not_chat_get_no_warning(engine: str, args: tuple[str]) -> None:
    assert missing_tool_flags(spec(engine, *args)) is None


@pytest.mark.parametrize(
    ("engine", "args", "says"),
    [
        ("vllm", (), "without --enable-auto-tool-choice and --tool-call-parser"),
        ("vllm", ("--enable-auto-tool-choice",), "without --tool-call-parser in engine_args"),
        ("llamacpp", ("--ctx-size", "4096"), "add --jinja (llama-server) or --chat_format"),
        ("llamacpp", ("--jinja", "--no-jinja"), "need llama-server's --jinja"),
        ("llamacpp", ("--chat_format", "alpaca"), "--chat_format alpaca parses no tool calls"),
    ],
)
def test_chat_specs_without_tool_flags_get_a_warning(
    engine: str, args: tuple[str], says: str
) -> None:
    problem = missing_tool_flags(spec(engine, *args))
    assert problem is not None
    assert problem.startswith("m: ")
    assert says in problem
    assert serves_chat(spec(engine, *args))


def test_submit_warns_on_stderr_and_still_submits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    models = write_models(
        tmp_path,
        "models:\n"
        "  - name: chat\n"
        "    engine: vllm\n"
        "    weights: {source: org/chat}\n"
        "  - name: tools\n"
        "    engine: vllm\n"
        "    weights: {source: org/tools}\n"
        "    engine_args: [--enable-auto-tool-choice, --tool-call-parser, hermes]\n",
    )
    code, out, err = run(
        capsys, "--models", str(models), "submit", "chat", "--dry-run", "-b", "slurm"
    )
    assert code == 0
    assert out.startswith("#!/bin/bash\n#SBATCH")  # the job script, as without the warning
    (warning,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: chat: vLLM answers requests with tools 400")
    assert "error:" not in err
    code, out, err = run(
        capsys, "--models", str(models), "submit", "tools", "--dry-run", "-b", "slurm"
    )
    assert code == 0
    assert "warning" not in err
