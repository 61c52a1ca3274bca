"""What the `mt tunnel` tests share: the real CLI in a subprocess, a stand-in gateway, ssh configs.

Every tunnel here is the real CLI (`python -m hpc.cli tunnel …`) in a subprocess, stopped by
its process id; the ssh processes it starts are found under it by pid and checked gone.
``login_http`` stands for the gateway where the real one is not the point: a plain HTTP
server that answers every GET with 200 (and echoes the path).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from sshd import SSHServer


@pytest.fixture
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the keys a test names, not those of whoever runs the tests (``usefixtures``)."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok", "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture(scope="module")
def login_http() -> Iterator[int]:
    """Stands for `mt gateway` on the login node: 200 on every GET. Yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def write_config(path: Path, login: SSHServer, known: Path, *, key: Path | None = None) -> Path:
    """An ssh config with ``Host login`` (and nothing from the runner's own config)."""
    path.write_text(
        "Host login\n"
        f"    HostName 127.0.0.1\n    Port {login.port}\n    User {login.user}\n"
        f"    IdentityFile {key or login.client_key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
    )
    return path


@dataclass
class Tunnel:
    proc: subprocess.Popen[str]
    url: str
    local_port: int
    stdout: str  # the env lines: OPENAI_API_KEY=… (if the login node has one), OPENAI_BASE_URL=…

    def env(self) -> dict[str, str]:
        """The printed lines as a mapping, as a shell or the openai client would read them."""
        return dict(line.split("=", 1) for line in self.stdout.splitlines() if "=" in line)


def ssh_children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_tunnel(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the tunnel by pid; kill it and its ssh children if they linger."""
    children = ssh_children(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    _gone, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        child.kill()
    assert not alive, f"the tunnel left processes running: {alive}"


def tunnel_argv(
    engine: str, config: Path, local_port: int, remote_port: int, *extra: str
) -> list[str]:
    return [
        sys.executable, "-m", "hpc.cli", "tunnel", "login",
        "--engine", engine, "--ssh-config", str(config),
        "--local-port", str(local_port), "--remote-port", str(remote_port),
        "--keepalive", "1", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def open_tunnel(
    engine: str, config: Path, remote_port: int, *extra: str, up_within_s: float = 60
) -> Iterator[Tunnel]:
    """`mt tunnel login …` in the foreground; yields once it printed its env lines (the
    base URL comes last); `tunnel up:` and any warning go to stderr."""
    local_port = free_port()
    proc = subprocess.Popen(
        tunnel_argv(engine, config, local_port, remote_port, *extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + up_within_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("OPENAI_BASE_URL="):
                break
        text = "".join(lines)
        assert "OPENAI_BASE_URL=" in text, text + (proc.stderr.read() if proc.stderr else "")
        yield Tunnel(proc, f"http://127.0.0.1:{local_port}", local_port, text)
    finally:
        stop_tunnel(proc)


def run_tunnel(
    engine: str, config: Path, remote_port: int, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`mt tunnel login …` expected to fail: returns when it exits."""
    return subprocess.run(
        tunnel_argv(engine, config, free_port(), remote_port, *extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def get(url: str, timeout_s: float = 5, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)  # noqa: S310 - http://127.0.0.1
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - http://127.0.0.1
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
