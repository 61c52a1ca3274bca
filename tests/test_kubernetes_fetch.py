"""The init containers' weight fetcher (hpc/k8s/fetch_weights.py) against a fake Hub.

``FakeHub`` stands for huggingface.co (no network here): it answers the Hub's HTTP API as
huggingface_hub calls it (``/api/models/<repo>/revision/<rev>`` with ``siblings``, files
from ``/<repo>/resolve/<rev>/<file>``, redirected to a storage host). The fetcher runs as
the pod runs it: ``python3 fetch_weights.py`` with its settings in the environment, here
with ``-I -S`` (no site-packages), so it needs nothing installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hpc.k8s.manifests import FETCH_COMMAND

FETCHER = Path(__file__).resolve().parent.parent / "hpc" / "k8s" / "fetch_weights.py"
TOKEN = "hf_GOLDEN_TOKEN"
REPOS = {
    "org/gguf": {"README.md": b"readme", "m-Q8_0.gguf": b"q8", "m-q4_k_m.gguf": b"q4"},
    "org/split": {
        "big-Q4_K_M-00001-of-00002.gguf": b"part1",
        "big-Q4_K_M-00002-of-00002.gguf": b"part2",
        "big-Q8_0.gguf": b"q8",
    },
    "org/hf": {"config.json": b"{}", "model.safetensors": b"weights", "sub/tok.json": b"t"},
}


class FakeHub:
    """A Hub host and a storage host on loopback; every request and its token is noted."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # (host, path, Authorization)
        self.hub = self._serve("127.0.0.1", self._hub_get)
        self.storage = self._serve("localhost", self._storage_get)

    def _serve(self, host: str, get: Any) -> ThreadingHTTPServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.seen.append((host, self.path, self.headers.get("Authorization")))
                status, headers, body = get(self.path)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def url(self, server: ThreadingHTTPServer, host: str) -> str:
        return f"http://{host}:{server.server_address[1]}"

    def _hub_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        if path.startswith("/api/models/"):
            repo, _, rev = path.removeprefix("/api/models/").partition("/revision/")
            if repo not in REPOS or rev != "main":
                return 404, {}, b'{"error": "Repository not found"}'
            siblings = [{"rfilename": name} for name in REPOS[repo]]
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps({"sha": "abc", "siblings": siblings}).encode(),
            )
        repo = "/".join(path.lstrip("/").split("/")[:2])
        name = path.split("/resolve/main/", 1)[1]
        if repo == "org/gated":
            return 401, {}, b"gated"
        storage = self.url(self.storage, "localhost")
        return 302, {"Location": f"{storage}/blobs/{repo}/{name}"}, b""

    def _storage_get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        _, _, org, repo, name = path.split("/", 4)
        return 200, {}, REPOS[f"{org}/{repo}"][name]

    def close(self) -> None:
        for server in (self.hub, self.storage):
            server.shutdown()
            server.server_close()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub()
    try:
        yield fake
    finally:
        fake.close()


def run_fetcher(
    hub: FakeHub, root: Path, engine: str, source: str, quant: str = "", *, ok: bool = True
) -> str:
    """The init container's command with its environment, on a Python without site-packages;
    its output (``ok``: it must succeed; else: it must fail)."""
    assert FETCH_COMMAND == ["python3", "/etc/modeltainer/fetch_weights.py"]
    env = {
        "PATH": os.environ["PATH"],
        "MT_ENGINE": engine,
        "MT_WEIGHTS_SOURCE": source,
        "MT_WEIGHTS_QUANT": quant,
        "MT_WEIGHTS_REVISION": "",
        "MT_WEIGHTS_DIR": str(root),
        "HF_TOKEN": TOKEN,
        "HF_ENDPOINT": hub.url(hub.hub, "127.0.0.1"),
    }
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(FETCHER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode == 0) is ok, done.stderr
    return done.stdout + done.stderr


def test_a_gguf_repo_fetches_only_the_quant_and_links_it(hub: FakeHub, tmp_path: Path) -> None:
    out = run_fetcher(hub, tmp_path / "weights", "llamacpp", "org/gguf", "Q4_K_M")
    link = tmp_path / "weights" / "model.gguf"
    assert "weights ready" in out
    assert link.read_bytes() == b"q4"
    hub_dir = tmp_path / "weights" / "hub" / "org--gguf"
    assert sorted(p.name for p in hub_dir.iterdir()) == ["m-q4_k_m.gguf"]  # only the quant
    # The token went to the Hub's host only, never to the storage host it redirected to.
    assert {auth for host, _, auth in hub.seen if host == "127.0.0.1"} == {f"Bearer {TOKEN}"}
    assert {auth for host, _, auth in hub.seen if host == "localhost"} == {None}
    downloads = len([s for s in hub.seen if s[0] == "localhost"])
    run_fetcher(hub, tmp_path / "weights", "llamacpp", "org/gguf", "Q4_K_M")
    assert len([s for s in hub.seen if s[0] == "localhost"]) == downloads  # found in place


def test_a_split_gguf_fetches_every_part(hub: FakeHub, tmp_path: Path) -> None:
    run_fetcher(hub, tmp_path / "w", "llamacpp", "org/split", "q4_k_m")
    assert (tmp_path / "w" / "model.gguf").read_bytes() == b"part1"
    parts = sorted(p.name for p in (tmp_path / "w" / "hub" / "org--split").iterdir())
    assert parts == ["big-Q4_K_M-00001-of-00002.gguf", "big-Q4_K_M-00002-of-00002.gguf"]


def test_a_vllm_model_is_the_whole_snapshot(hub: FakeHub, tmp_path: Path) -> None:
    run_fetcher(hub, tmp_path / "w", "vllm", "org/hf")
    model = tmp_path / "w" / "model"
    assert (model / "model.safetensors").read_bytes() == b"weights"
    assert (model / "sub" / "tok.json").read_bytes() == b"t"
    assert not list(model.rglob("*.part"))


def test_a_missing_quant_or_a_gated_repo_fails_with_the_reason(
    hub: FakeHub, tmp_path: Path
) -> None:
    REPOS["org/gated"] = {"m-Q4_K_M.gguf": b"secret"}
    try:
        out = run_fetcher(hub, tmp_path / "w", "llamacpp", "org/gguf", "IQ2", ok=False)
        assert "no GGUF file matching 'IQ2' in org/gguf" in out
        out = run_fetcher(hub, tmp_path / "w", "llamacpp", "org/gated", "Q4_K_M", ok=False)
        assert "HTTP 401" in out and "create the Secret hf-token" in out
        assert TOKEN not in out
    finally:
        del REPOS["org/gated"]
    assert not (tmp_path / "w" / "model.gguf").exists()
