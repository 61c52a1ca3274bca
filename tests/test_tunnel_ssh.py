"""`mt tunnel` against real OpenSSH servers on loopback (tests/sshd.py): both engines.

The "login node" is a real sshd on 127.0.0.1; the "jump host" is a second one. Every
tunnel here is the real CLI (`python -m hpc.cli tunnel …`) in a subprocess, stopped by its
process id; the ssh processes it starts are found under it by pid and checked gone.
Where the real gateway and the real Gemma engine are not the point, ``login_http`` stands
for the gateway: a plain HTTP server that answers ``GET /healthz`` (and echoes paths).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
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
from mtcli import GEMMA, gemma_models_yaml, mt, running_gateway
from sshd import SSHServer, fingerprint, keygen

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120)]

ENGINES = ["openssh", "paramiko"]


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the keys a test names: not those of whoever runs the tests."""
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
    stdout: str


def _ssh_children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(pid).children(recursive=True)
    return []


def stop_tunnel(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the tunnel by pid; kill it and its ssh children if they linger."""
    children = _ssh_children(proc.pid)
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
    """`mt tunnel login …` in the foreground; yields once it printed `tunnel up:`."""
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
            if "export OPENAI_BASE_URL=" in line:
                break
        text = "".join(lines)
        assert "tunnel up:" in text, text + (proc.stderr.read() if proc.stderr else "")
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


def get(url: str, timeout_s: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http://127.0.0.1
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# -- end to end: laptop → jump → login → gateway → real Gemma engine ---------------------


@pytest.fixture(scope="module")
def gemma_gateway(gemma_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real `mt gateway` with one ready Gemma job behind it (llama.cpp on the CPU)."""
    root = tmp_path_factory.mktemp("gemma-gateway")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MT_HOME", str(root / "mt-home"))
        env.setenv("MT_MODELS", str(gemma_models_yaml(root / "models.yaml", gemma_gguf)))
        with running_gateway() as url:
            job = json.loads(mt("submit", GEMMA, "--wait", "--json").stdout)["key"]
            try:
                deadline = time.monotonic() + 20
                while GEMMA not in get(f"{url}/v1/models")[1]:
                    assert time.monotonic() < deadline, "the gateway never listed Gemma"
                    time.sleep(0.2)
                yield url
            finally:
                mt("cancel", job, "--json")


@pytest.mark.llamacpp
@pytest.mark.timeout(240)
@pytest.mark.parametrize("engine", ENGINES)
def test_openai_client_streams_through_jump_and_login(
    engine: str, sshd: SSHServer, gemma_gateway: str, tmp_path: Path
) -> None:
    import openai

    jump = SSHServer.start(tmp_path / "jump")
    try:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line() + jump.known_hosts_line())
        config = write_config(tmp_path / "ssh_config", sshd, known)
        with config.open("a") as f:
            f.write(
                "Host bastion\n"
                f"    HostName 127.0.0.1\n    Port {jump.port}\n    User {jump.user}\n"
                f"    IdentityFile {jump.client_key}\n    IdentitiesOnly yes\n"
                f"    UserKnownHostsFile {known}\n    GlobalKnownHostsFile /dev/null\n"
            )
        gateway_port = int(gemma_gateway.rsplit(":", 1)[1])
        jumps, logins = jump.logins(), sshd.logins()
        with open_tunnel(engine, config, gateway_port, "--jump", "bastion") as tunnel:
            assert f"export OPENAI_BASE_URL={tunnel.url}/v1" in tunnel.stdout
            assert f"curl {tunnel.url}/v1/models" in tunnel.stdout
            assert (jump.logins(), sshd.logins()) == (jumps + 1, logins + 1)  # via the jump
            client = openai.OpenAI(base_url=tunnel.url + "/v1", api_key="unused", max_retries=0)
            stream = client.chat.completions.create(
                model=GEMMA,
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
            assert len([p for p in pieces if p]) > 1, pieces  # streamed in several chunks
            assert "".join(pieces).strip()
    finally:
        jump.stop()


# -- host keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_unknown_host_key_is_refused_with_its_fingerprint(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = write_config(tmp_path / "ssh_config", sshd, known)
    before = sshd.logins()
    done = run_tunnel(engine, config, login_http)
    assert done.returncode == 1, done.stderr
    assert "is not a known host" in done.stderr
    assert sshd.host_fingerprint() in done.stderr
    assert "hint:" in done.stderr and "--accept-new" not in done.stdout
    assert "Traceback" not in done.stderr
    assert known.read_text() == ""
    assert sshd.logins() == before


def _impostor_line(tmp_path: Path, sshd: SSHServer) -> str:
    other = keygen(tmp_path / "impostor")
    key_type, key = Path(f"{other}.pub").read_text().split()[:2]
    return f"[127.0.0.1]:{sshd.port} {key_type} {key}\n"


@pytest.mark.parametrize("engine", ENGINES)
def test_changed_host_key_is_refused(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(_impostor_line(tmp_path, sshd))
    text = known.read_text()
    config = write_config(tmp_path / "ssh_config", sshd, known)
    done = run_tunnel(engine, config, login_http, "--accept-new")  # accept-new never overrides
    assert done.returncode == 1, done.stderr
    assert "CHANGED" in done.stderr
    assert sshd.host_fingerprint() in done.stderr
    assert "ssh-keygen -R" in done.stderr
    assert known.read_text() == text


@pytest.mark.parametrize("engine", ENGINES)
def test_accept_new_adds_once_then_pins(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    config = write_config(tmp_path / "ssh_config", sshd, known)
    with open_tunnel(engine, config, login_http, "--accept-new") as tunnel:
        assert get(f"{tunnel.url}/healthz")[0] == 200
    pinned = known.read_text()
    assert len(pinned.splitlines()) == 1
    assert fingerprint(known) == sshd.host_fingerprint()  # ssh-keygen -lf reads known_hosts
    with open_tunnel(engine, config, login_http) as tunnel:  # pinned: no flag needed now
        assert get(f"{tunnel.url}/healthz")[0] == 200
    assert known.read_text() == pinned
    # The server's key changes (as an attacker's would): refused, even with --accept-new.
    real_key = sshd.host_key.read_text().split()[1]
    impostor_key = _impostor_line(tmp_path, sshd).split()[2]
    known.write_text(pinned.replace(real_key, impostor_key))
    done = run_tunnel(engine, config, login_http, "--accept-new")
    assert done.returncode == 1
    assert "CHANGED" in done.stderr


# -- local port, auth -----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_local_port_in_use_names_port_and_process(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = tunnel_argv(engine, config, port, login_http)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert f"error: local port {port} is already in use by " in done.stderr
    assert f"(pid {os.getpid()})" in done.stderr
    assert "--local-port" in done.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_key_fails_at_once_without_retrying(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    wrong = keygen(tmp_path / "wrong_key")
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts, key=wrong)
    connections = sshd.log_text().count("Connection from 127.0.0.1")
    started = time.monotonic()
    done = run_tunnel(engine, config, login_http)
    assert time.monotonic() - started < 15
    assert done.returncode == 1, done.stderr
    assert "error: SSH login" in done.stderr and "failed" in done.stderr
    assert "hint:" in done.stderr and "--identity" in done.stderr
    assert "Traceback" not in done.stderr
    time.sleep(0.5)  # sshd logs the connection it served; none may follow
    assert sshd.log_text().count("Connection from 127.0.0.1") == connections + 1


# -- resilience -----------------------------------------------------------------------------


def _restart(server: SSHServer) -> SSHServer:
    """The same sshd (same port, host key, authorized_keys) started again after stop()."""
    again = SSHServer._spawn(server.root, server.port)
    again._wait_ready(15)
    return again


def _wait_for(what: str, ok: object, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not ok():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError):
        return get(f"{url}/healthz", timeout_s=2)[0] == 200
    return False


@pytest.mark.parametrize("engine", ENGINES)
def test_drop_is_noticed_requests_fail_fast_and_it_reconnects(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    server = SSHServer.start(tmp_path / "own-sshd")  # its own: this test kills it
    servers = [server]
    try:
        server.known_hosts.write_text(server.known_hosts_line())
        config = write_config(tmp_path / "ssh_config", server, server.known_hosts)
        with open_tunnel(engine, config, login_http) as tunnel:
            assert _healthy(tunnel.url)
            state = Path(os.environ["MT_HOME"]) / "tunnels" / f"{tunnel.local_port}.json"

            def recorded() -> tuple[str, int]:
                record = json.loads(state.read_text())
                return record["state"], record["reconnects"]

            assert recorded() == ("up", 0)

            # 1. sshd's per-connection process dies: the tunnel connects again by itself.
            for pid in server.session_pids():
                os.kill(pid, signal.SIGKILL)
            _wait_for("a second login", lambda: server.logins() == 2, 20)
            _wait_for("the tunnel to carry requests again", lambda: _healthy(tunnel.url), 20)
            _wait_for("the state file to say up again", lambda: recorded() == ("up", 1), 5)

            # 2. The whole server is gone: requests fail at once, with a clear message.
            server.stop()
            deadline = time.monotonic() + 15
            while True:
                started = time.monotonic()
                try:
                    status, body = get(f"{tunnel.url}/v1/models", timeout_s=5)
                except OSError as exc:  # refused in the moment ssh exits
                    status, body = 0, str(exc)
                assert time.monotonic() - started < 2, "a request during the outage hung"
                if status == 503:
                    break
                assert time.monotonic() < deadline, f"never answered 503: {status} {body}"
                time.sleep(0.1)
            error = json.loads(body)["error"]
            assert "the SSH tunnel to login is down" in error["message"]
            _wait_for("the state file to say down", lambda: recorded()[0] == "down", 5)

            # 3. sshd is back on the same port: the tunnel reconnects within the backoff.
            servers.append(_restart(server))
            _wait_for("the tunnel to come back", lambda: _healthy(tunnel.url), 40)
            _wait_for("the state file to say up again", lambda: recorded() == ("up", 2), 5)
        assert tunnel.proc.returncode in (0, -signal.SIGTERM)
        assert not state.exists()
    finally:
        for s in servers:
            s.stop()


# -- background, status, close -------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_background_status_and_close(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    port = free_port()
    argv = tunnel_argv(engine, config, port, login_http, "--background", "--json")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    pid = record["pid"]
    try:
        assert record["url"] == f"http://127.0.0.1:{port}"
        assert (record["engine"], record["state"]) == (engine, "up")
        assert _healthy(record["url"])
        listed = json.loads(mt("tunnel", "status", "--json").stdout)
        assert [(r["local_port"], r["state"], r["pid"]) for r in listed] == [(port, "up", pid)]
        home = Path(os.environ["MT_HOME"]) / "tunnels"
        assert home.stat().st_mode & 0o777 == 0o700
        children = _ssh_children(pid)
        closed = json.loads(mt("tunnel", "close", "--json").stdout)
        assert closed == {"closed": [port]}
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        _gone, alive = psutil.wait_procs(children, timeout=5)
        assert not alive
        assert json.loads(mt("tunnel", "status", "--json").stdout) == []
        with pytest.raises(OSError):
            get(f"{record['url']}/healthz", timeout_s=2)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for proc in [*_ssh_children(pid), psutil.Process(pid)]:
                proc.kill()
