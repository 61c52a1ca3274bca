"""Every shell and Python example in README.md and docs/*.md runs, or says why it cannot.

Each ```bash, ```sh, ```console and ```python block is one test, in document order. A block
runs against a demo setup on this machine: the real `mt` CLI (this tree on PYTHONPATH), the
real llama.cpp engine with the real Gemma 3 270M model, a real gateway, and, for a block
preceded by ``<!-- needs: slurm -->``, the session's private Slurm cluster. Blocks of one
document share a working directory, ``$MT_HOME`` and exported variables, as a reader typing
them in one terminal would; background processes they start are stopped at the end, and
every job still live is cancelled.

A block that cannot run here is preceded by ``<!-- not-run: REASON: why -->`` with REASON
from ``NOT_RUN_REASONS``; it is reported as a skip with that reason (``pytest -ra`` lists
them all). Any other block without a marker must run and succeed.

In ```console blocks the commands are the lines that start with ``$ `` (the rest is
output); a console block without such lines is all commands. Placeholders a user fills in
are substituted from ``PLACEHOLDERS``; one left over fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from mtcli import gemma_models_yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = frozenset({"bash", "sh", "console", "python"})

# Why a block may be left unrun: what this machine (and CI) lacks.
NOT_RUN_REASONS = {
    "gpu": "needs a GPU (vLLM, or a model too large for a CPU)",
    "apptainer": "needs Apptainer (not packaged for Debian 12)",
    "kubernetes": "needs a Kubernetes or OpenShift API server",
    "docker": "needs a Docker engine",
    "remote": "needs a real remote site: a login node, a laptop, another host",
    "benchmark": "a measurement of minutes; tests/test_bench_*.py run the same code small",
    "suite": "builds the environment or runs this test suite itself",
    "peer": "runs another tool as a service (tests/test_export.py runs LiteLLM's for real)",
    "agent": "runs an agent or framework client (tests/test_agent_clients.py runs Codex CLI, "
    "Claude Code and LlamaStack for real)",
    "engine": "needs an engine that serves this API (vLLM, or llama.cpp's own llama-server, "
    "which the demo runs; not llama-cpp-python's server, the fallback)",
}

_FENCE = re.compile(r"^```([A-Za-z0-9_-]*)\s*$")
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*([a-z-]+)\s*:\s*(.+?)\s*-->$")
_NEEDS = re.compile(r"^<!--\s*needs:\s*([a-z, -]+?)\s*-->$")
_PLACEHOLDER = re.compile(r"<[a-z][a-z-]*>")

GATEWAY_PORT_IN_DOCS = "8081"
# The most recent job's key, as `mt status --json` lists it (the reader copies it by hand).
_LAST_JOB = (
    '"$(mt status --json | python -c \'import json, sys; print(json.load(sys.stdin)[-1]["key"])\')"'
)
PLACEHOLDERS = {
    "<job>": _LAST_JOB,
    "~/.mt/": "$MT_HOME/",  # the demo's state directory, not this machine user's
}


@dataclass(frozen=True)
class Block:
    """One fenced example: where it is, its language, its text and its markers."""

    doc: Path
    line: int
    language: str
    text: str
    not_run: tuple[str, str] | None = None
    needs: frozenset[str] = frozenset()

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(REPO).as_posix()}:{self.line}"


def extract_blocks(doc: Path) -> list[Block]:
    """The runnable-language blocks of ``doc`` with the marker line just before each."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        language, start = match.group(1), index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
        index = end + 1
        if language not in RUN_LANGUAGES:
            continue
        before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        not_run = _NOT_RUN.match(before.strip())
        needs = _NEEDS.match(before.strip())
        blocks.append(
            Block(
                doc=doc,
                line=start + 1,
                language=language,
                text="\n".join(lines[start + 1 : end]),
                not_run=(not_run.group(1), not_run.group(2)) if not_run else None,
                needs=frozenset(n.strip() for n in needs.group(1).split(","))
                if needs
                else (frozenset()),
            )
        )
    return blocks


def console_commands(text: str) -> str:
    """The commands of a console block: ``$ `` lines and their continuations."""
    lines = text.splitlines()
    if not any(line.startswith("$ ") for line in lines):
        return text
    commands: list[str] = []
    continuing = False
    for line in lines:
        if line.startswith("$ "):
            commands.append(line[2:])
        elif continuing:
            commands.append(line)
        else:
            continue
        continuing = line.rstrip().endswith("\\")
    return "\n".join(commands)


def script_of(block: Block, port: int) -> str:
    """The shell text that runs ``block``, placeholders and the gateway port substituted."""
    if block.language == "python":
        body = f"python - <<'MT_DOCS_PYTHON'\n{block.text}\nMT_DOCS_PYTHON"
    elif block.language == "console":
        body = console_commands(block.text)
    else:
        body = block.text
    for placeholder, value in PLACEHOLDERS.items():
        body = body.replace(placeholder, value)
    left = sorted(set(_PLACEHOLDER.findall(body)) - {"<<"})
    assert not left, f"{block.id}: placeholders with no value in PLACEHOLDERS: {left}"
    return body.replace(GATEWAY_PORT_IN_DOCS, str(port))


# Variables a block sets are kept for the next block (a reader's terminal keeps them), but
# not bash's own: read-only ones, and those bash sets itself.
_SHELL_OWN = (
    "'^declare -[-a-zA-Z]*r|^declare -[-a-zA-Z]* (BASH|PIPESTATUS|FUNCNAME|GROUPS|DIRSTACK|"
    "RANDOM|SRANDOM|SECONDS|LINENO|HISTCMD|EPOCH|OPTIND|OPTERR|IFS|PS4|PPID|SHLVL|PWD|OLDPWD|"
    "COLUMNS|LINES|_=)'"
)

ALL_BLOCKS = [block for doc in DOCS for block in extract_blocks(doc)]
# A document's session is cleaned up after its last block, so engines of one page do not
# slow down the next (two cores are enough for one small model at a time, not for eight).
LAST_OF_DOC = {block.doc: block.id for block in ALL_BLOCKS}


def test_every_marker_names_an_allowed_reason() -> None:
    bad = [
        f"{b.id}: {b.not_run[0]!r}"
        for b in ALL_BLOCKS
        if b.not_run is not None and b.not_run[0] not in NOT_RUN_REASONS
    ]
    assert not bad, f"not-run reasons must be one of {sorted(NOT_RUN_REASONS)}: {bad}"
    assert sum(b.not_run is None for b in ALL_BLOCKS) >= 10, "most examples should run"


def test_extraction_reads_console_prompts_and_markers(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    doc.write_text(
        "text\n\n<!-- not-run: gpu: a 30B model -->\n```console\n$ mt submit big \\\n"
        "    --wait\noutput line\n$ mt status\n```\n\n```text\nnot a command\n```\n"
        "<!-- needs: slurm -->\n```bash\necho hi\n```\n",
        encoding="utf-8",
    )
    first, second = extract_blocks(doc)
    assert first.not_run == ("gpu", "a 30B model") and first.line == 4
    assert console_commands(first.text) == "mt submit big \\\n    --wait\nmt status"
    assert second.needs == {"slurm"} and second.not_run is None and second.text == "echo hi"


@dataclass
class DocSession:
    """One document's terminal: its directory, exported variables, background processes."""

    workdir: Path
    env: dict[str, str]
    state: Path
    groups: list[int] = field(default_factory=list)
    cluster: Any = None  # the Slurm cluster, once a block of this document needed it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Path, DocSession]]:
    """Per-document sessions, created on first use; stopped and cleaned up at the end."""
    made: dict[Path, DocSession] = {}
    yield made
    for session in made.values():
        _cleanup(session)


def _cleanup(session: DocSession) -> None:
    listed = subprocess.run(
        ["mt", "status", "--json"],
        env=session.env,
        cwd=session.workdir,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if listed.returncode == 0:
        for record in json.loads(listed.stdout or "[]"):
            if record["state"] not in ("gone", "failed"):
                subprocess.run(
                    ["mt", "cancel", record["key"]],
                    env=session.env,
                    cwd=session.workdir,
                    capture_output=True,
                    check=False,
                    timeout=60,
                )
    if session.cluster is not None:
        session.cluster.cancel_all()  # jobs submitted by hand (sbatch) too
    for group in session.groups:
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            continue


def _session(
    block: Block,
    sessions: dict[Path, DocSession],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> DocSession:
    if block.doc in sessions:
        return sessions[block.doc]
    gguf: Path = request.getfixturevalue("gemma_gguf")
    workdir = tmp_path_factory.mktemp(block.doc.stem)
    home = workdir / "mt-home"
    # The demo's models.yaml: what docs call `gemma-3-270m`, served by llama.cpp on the CPU.
    gemma_models_yaml(workdir / "models.yaml", gguf)
    port = _free_port()
    # The demo's site.yaml moves the gateway's default port (8081 in the docs) to a free one,
    # so `mt gateway` without --port works beside other test runs on this machine.
    home.mkdir(mode=0o700)
    (home / "site.yaml").write_text(f"gateway: {{port: {port}}}\n", encoding="utf-8")
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", str(workdir)),
        "LANG": "C.UTF-8",
        "MT_HOME": str(home),
        "PYTHONPATH": str(REPO),
        "MT_DOCS_GATEWAY_PORT": str(port),
        "NO_COLOR": "1",
    }
    state = workdir / ".mt-docs-state"
    state.write_text("", encoding="utf-8")
    session = DocSession(workdir=workdir, env=env, state=state)
    sessions[block.doc] = session
    return session


@pytest.mark.llamacpp
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_example_runs(
    block: Block,
    sessions: dict[Path, DocSession],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The block runs to exit code 0 in its document's session (or is a listed skip)."""
    try:
        _run_block(block, sessions, request, tmp_path_factory)
    finally:
        if LAST_OF_DOC[block.doc] == block.id and block.doc in sessions:
            _cleanup(sessions.pop(block.doc))


def _run_block(
    block: Block,
    sessions: dict[Path, DocSession],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if block.not_run is not None:
        reason, why = block.not_run
        pytest.skip(f"{block.id}: not-run ({reason}: {NOT_RUN_REASONS.get(reason, '?')}): {why}")
    session = _session(block, sessions, request, tmp_path_factory)
    env = dict(session.env)
    if "slurm" in block.needs:
        session.cluster = request.getfixturevalue("slurm_cluster")
        env |= {k: v for k, v in session.cluster.env.items() if k.startswith("SLURM")}
    body = script_of(block, int(env["MT_DOCS_GATEWAY_PORT"]))
    cwd_file = session.state.with_suffix(".cwd")
    cwd = cwd_file.read_text(encoding="utf-8").strip() if cwd_file.exists() else ""
    state, where = shlex.quote(str(session.state)), shlex.quote(cwd or str(session.workdir))
    script = (
        "set -eo pipefail\n"
        f"source {state}\n"
        f"cd {where}\n"
        f"{body}\n"
        f"declare -p | grep -Ev {_SHELL_OWN} > {state} || true\n"
        f"pwd > {shlex.quote(str(cwd_file))}\n"
    )
    log = session.state.with_suffix(f".{block.line}.log")
    # Output to a file, not a pipe: a background process the block starts (a gateway) keeps
    # its inherited stdout open, and reading a pipe to EOF would wait for it.
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            env=env,
            cwd=session.workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its background processes stay in this group
        )
    session.groups.append(proc.pid)
    try:
        proc.wait(timeout=540)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        output = log.read_text(encoding="utf-8", errors="replace")
        pytest.fail(f"{block.id} did not finish in 540 s:\n{body}\n--- output ---\n{output}")
    output = log.read_text(encoding="utf-8", errors="replace")
    assert proc.returncode == 0, (
        f"{block.id} exited {proc.returncode}:\n{body}\n--- output ---\n{output[-4000:]}"
    )
