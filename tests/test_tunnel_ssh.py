"""`mt tunnel` against real OpenSSH servers on loopback (tests/sshd.py): both engines.

The "login node" is a real sshd on 127.0.0.1; the "jump host" is a second one. The
helpers (the real CLI in a subprocess, the ``login_http`` stand-in gateway) are in
tests/tunnelkit.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from mtcli import mt
from sshd import SSHServer, fingerprint, keygen
from tunnelkit import (
    free_port,
    get,
    open_tunnel,
    run_tunnel,
    ssh_children,
    tunnel_argv,
    write_config,
)

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120), pytest.mark.usefixtures("no_agent")]

ENGINES = ["openssh", "paramiko"]


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
    # Detached, the same error reaches the command that started it (through its record),
    # and no record is left behind.
    background = run_tunnel(engine, config, login_http, "--background")
    assert (background.returncode, background.stderr) == (1, done.stderr)
    assert json.loads(mt("tunnel", "status", "--json").stdout) == []


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
        children = ssh_children(pid)
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
            for proc in [*ssh_children(pid), psutil.Process(pid)]:
                proc.kill()
