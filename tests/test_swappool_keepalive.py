"""Streams for a model that is still loading, through the real gateway to a local swap pool
of the real Gemma: SSE comments keep the stream alive past the gateway's first-token
timeout, a failed load ends the stream in-band, the 503 before the pool runs names the pool,
and `mt render POOL` writes the script `mt submit POOL --dry-run` prints.

A load is made longer than the timeout without timing anything: the freshly spawned engine
is stopped (SIGSTOP) until the client has seen more keep-alive comments than fit in the
timeout (they come at least ``keepalive_s`` apart), then let go (SIGCONT).
"""

from __future__ import annotations

import json
import re
import signal
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mtcli import mt, owner_headers, running_gateway
from poolhelpers import (
    MODEL_A,
    MODEL_B,
    ask,
    engines_of,
    listed,
    pool_models_yaml,
    pool_record,
    pool_status,
    slot_of,
    wait_for,
)

from hpc import tlspin


def _open(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    timeout: float = 180,
    pin: str | None = None,
) -> Any:
    """POST ``body`` as JSON; the response, to read (or iterate line by line) as it comes.
    ``pin``: a job's certificate digest (its record's ``tls_sha256``), for a job's URL."""
    request = urllib.request.Request(  # noqa: S310 - a test URL
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    context = tlspin.pinned_context(pin) if pin else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)  # noqa: S310


def _post(url: str, body: dict[str, Any], timeout: float = 180) -> tuple[int, dict[str, Any]]:
    """POST ``body`` to the gateway; the status and the JSON answer, error statuses included."""
    try:
        with _open(url, body, owner_headers(), timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

BROKEN = "gemma-broken"
FIRST_TOKEN_TIMEOUT_S = 1.0
KEEPALIVE_S = 0.2
PROGRESS = re.compile(rb"^: loading \S+ \(\d+s\)$")


def _pool_yaml(tmp_path: Path, gguf: Path) -> Path:
    # The real llama.cpp server refuses an unknown flag and exits: a load that fails.
    broken = {
        "name": BROKEN,
        "engine": "llamacpp",
        "weights": {"source": str(gguf)},
        "engine_args": ["--no-such-flag", "1"],
        "startup_timeout_s": 120,
    }
    pool = {
        "name": "gemma-pool",
        "models": [MODEL_A, MODEL_B, BROKEN],
        "slots": 1,
        "keepalive_s": KEEPALIVE_S,
    }
    return pool_models_yaml(tmp_path / "models.yaml", gguf, pool, extra=(broken,))


@pytest.fixture
def pool(gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MT_MODELS", str(_pool_yaml(tmp_path, gemma_gguf)))
    record = json.loads(mt("submit", "gemma-pool", "--wait", "--json").stdout)
    assert record["state"] == "ready"
    key: str = record["key"]
    yield key
    mt("cancel", key, check=False)


class _RawStream(threading.Thread):
    """One streaming chat request read line by line, as sent (comments included)."""

    def __init__(self, url: str, model: str) -> None:
        super().__init__(daemon=True)
        self.url, self.model = url, model
        self.lines: list[bytes] = []
        self.status: int | None = None
        self.content_type = ""

    def run(self) -> None:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
        url = self.url + "/chat/completions"
        with _open(url, body, owner_headers()) as response:
            self.status = response.status
            self.content_type = response.headers.get("content-type", "")
            for line in response:
                self.lines.append(line.rstrip(b"\r\n"))

    def progress(self) -> int:
        """How many ``: loading <model> (Ns)`` comments have arrived so far."""
        return sum(1 for line in list(self.lines) if PROGRESS.match(line))

    def data(self) -> list[bytes]:
        return [line for line in self.lines if line.startswith(b"data:")]


def _gateway_args() -> tuple[str, ...]:
    return ("--first-token-timeout", str(FIRST_TOKEN_TIMEOUT_S))


def test_a_load_longer_than_the_first_token_timeout_streams_whole(pool: str) -> None:
    record = pool_record(pool)
    assert record.pid is not None
    with running_gateway(*_gateway_args()) as gateway:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, MODEL_A, MODEL_B), 15)
        reader = _RawStream(url, MODEL_A)
        reader.start()
        [engine] = wait_for("A's engine", lambda: engines_of(record.pid or 0, MODEL_A), 60)
        engine.send_signal(signal.SIGSTOP)
        try:
            # More comments than fit in the timeout: the load has outlasted it.
            needed = int(FIRST_TOKEN_TIMEOUT_S / KEEPALIVE_S) + 1
            wait_for("keep-alive comments", lambda: reader.progress() >= needed, 60)
            loading = slot_of(pool_status(record), MODEL_A)
            assert loading is not None and loading["state"] == "loading"
            assert not reader.data()  # nothing but comments yet
        finally:
            engine.send_signal(signal.SIGCONT)
        reader.join(180)
        assert not reader.is_alive()
        assert reader.status == 200 and reader.content_type.startswith("text/event-stream")
        assert reader.lines[0] == f": loading {MODEL_A} in slot 0".encode()
        first_data = reader.lines.index(reader.data()[0])
        assert all(line.startswith(b":") or not line for line in reader.lines[:first_data]), (
            reader.lines
        )
        data = reader.data()
        assert data[-1] == b"data: [DONE]", data
        assert not any(b'"error"' in line for line in data)
        text = "".join(
            choice["delta"].get("content") or ""
            for line in data[:-1]
            for choice in json.loads(line[len(b"data:") :])["choices"]
        )
        assert text.strip()

        # The official client ignores the comments of a cold model's stream (B swaps A out).
        answered, text = ask(url, MODEL_B, stream=True)
        assert answered == MODEL_B and text.strip()


def test_a_failed_load_ends_the_stream_in_band(pool: str) -> None:
    record = pool_record(pool)
    with running_gateway(*_gateway_args()) as gateway:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, BROKEN), 15)
        reader = _RawStream(url, BROKEN)
        reader.run()
        assert reader.status == 200  # committed by the comment, before the load failed
        assert reader.lines[0] == f": loading {BROKEN} in slot 0".encode()
        data = reader.data()
        assert len(data) == 1 and b"[DONE]" not in data[0], reader.lines
        error = json.loads(data[0][len(b"data:") :])["error"]
        assert error["code"] == "upstream_error"
        assert f"cannot load {BROKEN}: engine exited before it was healthy" in error["message"]
        slot = pool_status(record)["slots"][0]
        assert slot["state"] == "empty" and "exited" in slot["last_error"]

    # The same model, not streamed: the 503 the pool gives the gateway stays a 503. The
    # pool loads it again first, silently (no keep-alives without a stream), and how long a
    # broken engine takes to exit depends on the machine's load: this gateway waits for it.
    with running_gateway("--first-token-timeout", "60") as gateway:
        url = gateway + "/v1"
        wait_for("the gateway to route the catalogue", lambda: listed(url, BROKEN), 15)
        status, answer = _post(
            url + "/chat/completions",
            {"model": BROKEN, "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 503, answer
        assert "engine exited" in answer["error"]["message"]


def test_the_503_before_the_pool_runs_names_the_pool(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_pool_yaml(tmp_path, gemma_gguf)))
    with running_gateway() as gateway:
        status, answer = _post(
            gateway + "/v1/chat/completions",
            {"model": MODEL_B, "messages": [{"role": "user", "content": "x"}]},
            timeout=30,
        )
    assert status == 503
    error: dict[str, Any] = answer["error"]
    assert error["code"] == "no_ready_endpoint"
    assert "hint: mt submit gemma-pool" in error["message"], error


def test_render_writes_the_dry_run_script(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MT_MODELS", str(_pool_yaml(tmp_path, gemma_gguf)))
    out = tmp_path / "pool.sbatch"
    mt("render", "gemma-pool", "-o", str(out))
    dry = mt("submit", "gemma-pool", "--dry-run", "--backend", "slurm").stdout
    rendered = out.read_text(encoding="utf-8")
    nonce = re.compile(r"mt-gemma-pool-[0-9a-f]{8}|\bmt:[0-9a-f]{8}\b|\b[0-9a-f]{8}\b")
    assert "#SBATCH" in rendered and "hpc.job.swappool" in rendered
    assert nonce.sub("NONCE", rendered) == nonce.sub("NONCE", dry)

    # On Kubernetes the pool runs in one image with its engines: a pool must name it.
    mt("keys", "create", "alice")  # the rendered gateway's client keys
    refused = mt("render", "gemma-pool", "--backend", "kubernetes", check=False)
    assert refused.returncode == 1
    assert "gemma-pool: a swap pool's pod runs the pool process" in refused.stderr
    assert "hint: set kubernetes.image of the pool" in refused.stderr


def test_a_client_that_leaves_during_the_load_leaves_no_request_behind(pool: str) -> None:
    record = pool_record(pool)
    assert record.pid is not None and record.base_url is not None
    secret = record.api_key.get_secret_value()
    body = {
        "model": MODEL_B,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 4,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {secret}"}
    url = record.base_url + "/chat/completions"
    with _open(url, body, headers, timeout=60, pin=record.tls_sha256) as response:
        [engine] = wait_for("B's engine", lambda: engines_of(record.pid or 0, MODEL_B), 60)
        engine.send_signal(signal.SIGSTOP)
        assert response.readline().rstrip(b"\r\n") == f": loading {MODEL_B} in slot 0".encode()
    # The client is gone; the next keep-alive finds out. The load itself goes on.
    engine.send_signal(signal.SIGCONT)
    ready = wait_for(
        "B loaded with nothing in flight",
        lambda: (
            (s := slot_of(pool_status(record), MODEL_B)) is not None
            and s["state"] == "ready"
            and s["in_flight"] == 0
        ),
        60,
    )
    assert ready
    # A whole request after it: a slot that counted the one that left would stay at 1.
    with _open(url, body, headers, timeout=60, pin=record.tls_sha256) as response:
        assert [line.rstrip(b"\r\n") for line in response][-2:] == [b"data: [DONE]", b""]
    slot = slot_of(pool_status(record), MODEL_B)
    assert slot is not None and slot["in_flight"] == 0 and slot["loads"] == 1
    log = mt("logs", pool).stdout
    assert "serving" in log and "Traceback" not in log and "unhandled" not in log, log
