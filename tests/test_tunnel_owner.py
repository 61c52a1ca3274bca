"""`mt tunnel` hands the laptop the gateway owner's key: read over its own SSH connection
(a real sshd on loopback, tests/sshd.py), printed as OPENAI_*= lines that the real `openai`
client uses unmodified, or written to a 0600 --env-file. Both engines.

The "login node" is this machine: the gateway is the real `mt gateway` (no models needed:
/v1/models answers an empty list), its owner key in the test's MT_HOME, which the tunnel is
pointed at with --owner-key (sshd gives the login shell its own environment, not MT_HOME).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from mtcli import owner_key, running_gateway
from sshd import SSHServer
from test_gateway_owner import status_of
from tunnelkit import free_port, open_tunnel, ssh_children, tunnel_argv, write_config

from hpc.ownerkey import owner_key_path
from hpc.site import mt_home

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(180), pytest.mark.usefixtures("no_agent")]

ENGINES = ["openssh", "paramiko"]

# The openai client as a user runs it: no arguments, everything from OPENAI_* variables.
_CLIENT = "import openai; print(len(openai.OpenAI(max_retries=0).models.list().data))"


def _openai_with(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.run(
        [sys.executable, "-c", _CLIENT],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _argv_holding(secret: str) -> list[str]:
    hits = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(secret in arg for arg in proc.info["cmdline"] or ()):
                hits.append(f"{proc.info['pid']}: {proc.info['cmdline'][:3]}")
    return hits


def _remote_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_printed_lines_work_with_the_openai_client_unmodified(
    engine: str, sshd: SSHServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    with running_gateway() as gateway_url:
        key_file = owner_key_path(mt_home())
        port = _remote_port(gateway_url)
        with open_tunnel(engine, config, port, "--owner-key", str(key_file)) as tunnel:
            env = tunnel.env()
            assert env == {"OPENAI_API_KEY": owner_key(), "OPENAI_BASE_URL": f"{tunnel.url}/v1"}
            assert _argv_holding(owner_key()) == []  # read by path: in no argv, here or there
            used = _openai_with(env)
            assert used.returncode == 0, used.stderr
            assert used.stdout.strip() == "0"  # the gateway's model list, empty here
            refused = _openai_with(env | {"OPENAI_API_KEY": "mt-" + "x" * 43})
            assert "AuthenticationError" in refused.stderr
            assert status_of(f"{tunnel.url}/v1/models", None) == 401


@pytest.mark.parametrize("engine", ENGINES)
def test_env_file_holds_the_key_0600_and_it_is_not_printed(
    engine: str, sshd: SSHServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    env_file = tmp_path / "env dir" / "hpc.env"  # a space: the path is never a shell word here
    with running_gateway() as gateway_url:
        extra = ("--owner-key", str(owner_key_path(mt_home())), "--env-file", str(env_file))
        with open_tunnel(engine, config, _remote_port(gateway_url), *extra) as tunnel:
            assert owner_key() not in tunnel.stdout
            assert tunnel.env() == {"OPENAI_BASE_URL": f"{tunnel.url}/v1"}
            assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
            # What `set -a; . FILE` gives the client, read by a real shell.
            shell = subprocess.run(
                [
                    "bash",
                    "-c",
                    'set -a; . "$1"; set +a; exec "$2" -c "$3"',
                    "-",
                    str(env_file),
                    sys.executable,
                    _CLIENT,
                ],
                env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert shell.returncode == 0, shell.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_no_owner_key_on_the_login_node_is_a_warning_with_a_hint(
    engine: str, sshd: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    missing = tmp_path / "never ran" / "owner.key"
    with open_tunnel(engine, config, login_http, "--owner-key", str(missing)) as tunnel:
        assert tunnel.env() == {"OPENAI_BASE_URL": f"{tunnel.url}/v1"}
        assert tunnel.proc.poll() is None  # the tunnel itself stays up
        tunnel.proc.terminate()
        _out, err = tunnel.proc.communicate(timeout=30)
    assert f"warning: no owner key at {missing}" in err
    assert "hint: start `mt gateway` there once" in err


def test_background_hands_the_key_over_in_a_private_file_then_removes_it(
    sshd: SSHServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", sshd, sshd.known_hosts)
    with running_gateway() as gateway_url:
        port = free_port()
        argv = tunnel_argv(
            "paramiko", config, port, _remote_port(gateway_url),
            "--owner-key", str(owner_key_path(mt_home())), "--background", "--json",
        )  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        pid = record["pid"]
        try:
            assert record["env"] == {
                "OPENAI_API_KEY": owner_key(),
                "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
            }
            tunnels = mt_home() / "tunnels"
            assert sorted(p.name for p in tunnels.iterdir()) == [f"{port}.json", f"{port}.log"]
            assert owner_key() not in (tunnels / f"{port}.log").read_text()
            assert owner_key() not in (tunnels / f"{port}.json").read_text()
            assert _openai_with(record["env"]).returncode == 0
        finally:
            with contextlib.suppress(psutil.NoSuchProcess):
                for proc in [*ssh_children(pid), psutil.Process(pid)]:
                    proc.kill()
