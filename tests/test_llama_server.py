"""llama.cpp's own `llama-server` (what users and the recipes' images run) through the job
wrapper, for real: the binary `make test` builds from llama-cpp-python's vendored llama.cpp
(MT_LLAMA_SERVER), first on the PATH, so `engine: llamacpp` runs it exactly as a job on a
node without a container would: on a Unix socket in the job's 0700 directory
(`--host …/engine.sock`), its key from `--api-key-file /dev/fd/3` (hpc.job.keypipe), behind
the job's front.

What it shows: the flags users write for llama-server work (the job runs
docs/examples/models.yaml's llama.cpp entry with its engine_args as written: `--ctx-size`);
the job becomes ready; the real `openai` client streams through the gateway (several chunks,
`[DONE]`); another Unix user reaches nothing of it (every route 401, the socket refused, no
TCP listener: tests/test_crossuser.py's checks); `mt cancel` leaves no process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from jobclient import job_openai
from mtcli import GEMMA, llama_server_binary, mt, owner_key, ready_job, running_gateway
from otheruser import OtherUser
from test_crossuser import KNOWN_ROUTES, LLAMA_SERVER_ROUTES, check_reach

from hpc.registry import Record, Registry

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "models.yaml"

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]


@pytest.fixture
def llama_server_first(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The built llama-server, first on the PATH the job wrapper searches."""
    binary = llama_server_binary(LLAMA_SERVER)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    yield binary


def example_entry() -> dict[str, Any]:
    """docs/examples/models.yaml's llama.cpp model, as the docs write it."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    [entry] = [m for m in example["models"] if m["name"] == GEMMA]
    return dict(entry)


def _models(tmp_path: Path, gguf: Path) -> Path:
    """The example's entry with its engine and engine_args as written, the real GGUF in it."""
    entry = example_entry()
    assert (entry["engine"], entry["engine_args"]) == ("llamacpp", ["--ctx-size", "4096"])
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        f"  - name: {GEMMA}\n"
        f"    engine: {entry['engine']}\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        f"    engine_args: {json.dumps(entry['engine_args'])}\n"
        "    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    return path


def _stored(job: str) -> Record:
    record = Registry(Path(os.environ["MT_HOME"]) / "registry").read(job)
    assert record is not None, job
    return record


def test_llama_server_serves_a_job_behind_its_front(
    llama_server_first: Path,
    gemma_gguf: Path,
    other_user: OtherUser,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import openai

    monkeypatch.setenv("MT_MODELS", str(_models(tmp_path, gemma_gguf)))
    with ready_job(GEMMA) as submitted, running_gateway() as url:
        job = str(submitted["key"])
        record = _stored(job)
        assert record.engine_pid is not None
        argv = psutil.Process(record.engine_pid).cmdline()
        assert argv[0] == str(llama_server_first), argv  # the real one, exec'd by keypipe
        assert argv[argv.index("--host") + 1].endswith("/engine.sock")
        assert argv[argv.index("--api-key-file") + 1] == "/dev/fd/3"
        assert "--ctx-size" in argv

        client = openai.OpenAI(base_url=url + "/v1", api_key=owner_key(), max_retries=0)
        stream = client.completions.create(
            model=GEMMA, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True
        )
        pieces = [c.choices[0].text for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1, pieces  # streamed, not one block
        # One after the other, straight to the job's front: llama-server closes a socket
        # connection the front would reuse (a 502 one time in a few, before the front
        # took a new connection per request).
        direct = job_openai(record)
        for _ in range(6):
            again = direct.completions.create(model=GEMMA, prompt="Hi", max_tokens=4, stream=True)
            assert [c for c in again if c.choices]

        log = Path(os.environ["MT_HOME"]) / "logs" / f"{job}.log"
        routes = sorted(set(KNOWN_ROUTES) | set(LLAMA_SERVER_ROUTES))
        check_reach(other_user, record, log, routes=routes)
        engine = psutil.Process(record.engine_pid)
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    assert mt("status", "--json").returncode == 0
