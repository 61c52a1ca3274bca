"""SSHTransport against a real OpenSSH server on loopback (tests/sshd.py): no mocks.

Every command here really runs through sshd and root's login shell on 127.0.0.1; host keys,
client keys and known_hosts files are real ones made with ssh-keygen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from sshd import SSHServer, fingerprint, keygen

from hpc.errors import (
    ChangedHostKeyError,
    SlurmError,
    SSHAuthError,
    SSHError,
    UnknownHostKeyError,
)
from hpc.slurm.client import SlurmClient
from hpc.ssh.exec import SSHTransport
from hpc.ssh.failures import ConnectionLost
from hpc.transport import CommandTimeout

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(60)]

ECHO_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"
HOSTILE = [
    "two words",
    "it's",
    '"double"',
    "; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "| touch {canary}",
    "&& touch {canary} &",
    "line one\nline two\n",
    "$HOME",
    "${PATH}",
    "*",
    "~",
    "",
    "-n",
    "--",
    "back\\slash\\",
    "tab\there",
    "{a,b}",
    "!bang",
    "#hash",
    "<in >out 2>&1",
    "unicodé ✓",
    "'",
    "\\'",
]


@pytest.fixture(autouse=True)
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the keys a test names: not those of whoever runs the tests."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


@pytest.fixture
def ssh_config(tmp_path: Path) -> Path:
    """An empty ssh config, so the runner's ~/.ssh/config changes nothing."""
    path = tmp_path / "ssh_config"
    path.write_text("")
    return path


def connect(sshd: SSHServer, ssh_config: Path, **overrides: object) -> SSHTransport:
    options: dict[str, object] = {
        "port": sshd.port,
        "user": sshd.user,
        "key_filename": sshd.client_key,
        "known_hosts": sshd.known_hosts,
        "ssh_config": ssh_config,
        "connect_timeout_s": 10,
    }
    options.update(overrides)
    return SSHTransport("127.0.0.1", **options)  # type: ignore[arg-type]


@pytest.fixture
def transport(sshd: SSHServer, ssh_config: Path) -> Iterator[SSHTransport]:
    with connect(sshd, ssh_config) as t:
        yield t


def test_stdout_stderr_and_exit_code(transport: SSHTransport) -> None:
    result = transport.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout_s=20)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert transport.run(["whoami"], timeout_s=20).stdout == "root\n"


def test_stdin_is_delivered(transport: SSHTransport) -> None:
    result = transport.run(["cat"], stdin="#!/bin/bash\necho hi\n", timeout_s=20)
    assert result.stdout == "#!/bin/bash\necho hi\n"
    assert transport.run(["cat"], timeout_s=20).stdout == ""  # no stdin: EOF at once


def test_large_stdin_and_stdout_do_not_deadlock(transport: SSHTransport) -> None:
    """More than the SSH window each way at once: input is fed while output is read."""
    data = "".join(f"{i:07d} {'x' * 56}\n" for i in range(80_000))  # 5 MB
    result = transport.run(["cat"], stdin=data, timeout_s=50)
    assert result.returncode == 0
    assert result.stdout == data


def test_hostile_argv_arrives_unchanged(transport: SSHTransport, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    args = [a.replace("{canary}", str(canary)) for a in HOSTILE]
    result = transport.run(["python3", "-c", ECHO_ARGV, *args], timeout_s=20)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == args
    assert not canary.exists()


def test_remote_env_is_quoted(sshd: SSHServer, ssh_config: Path, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    value = f"/a b/slurm.conf'; touch {canary}; echo '$(touch {canary})\nnext"
    with connect(sshd, ssh_config, remote_env={"SLURM_CONF": value, "MT_OTHER": ""}) as t:
        probe = "import os, json; print(json.dumps([os.environ[k] for k in ('SLURM_CONF', 'MT_OTHER')]))"  # noqa: E501
        result = t.run(["python3", "-c", probe], timeout_s=20)
    assert json.loads(result.stdout) == [value, ""]
    assert not canary.exists()
    with pytest.raises(ValueError, match="not environment variable names"):
        SSHTransport("127.0.0.1", remote_env={"A B": "x"})


def test_missing_command_is_file_not_found(transport: SSHTransport) -> None:
    with pytest.raises(FileNotFoundError, match="no-such-sbatch"):
        transport.run(["no-such-sbatch", "--parsable"], timeout_s=20)
    # ... which is how the Slurm client tells "not installed" from "failed".
    with pytest.raises(SlurmError, match="no-such-squeue is not installed"):
        SlurmClient(transport, timeout_s=20).run(["no-such-squeue", "--json"])


def test_timeout_is_command_timeout_and_the_connection_lives_on(
    transport: SSHTransport, tmp_path: Path
) -> None:
    pid_file = tmp_path / "sleeper.pid"
    started = time.monotonic()
    try:
        with pytest.raises(CommandTimeout) as caught:
            transport.run(["sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 30'], timeout_s=1.5)
        assert 1.5 <= time.monotonic() - started < 10
        assert caught.value.argv[0] == "sh"
        assert transport.run(["echo", "still here"], timeout_s=20).stdout == "still here\n"
        assert transport.connections == 1
    finally:
        if pid_file.exists():  # the remote sleep outlives its closed channel: end it by pid
            pid = int(pid_file.read_text())
            if psutil.pid_exists(pid):
                os.kill(pid, signal.SIGKILL)


def test_one_connection_for_many_commands(sshd: SSHServer, ssh_config: Path) -> None:
    before = sshd.logins()
    with connect(sshd, ssh_config) as t:
        assert sshd.logins() == before  # lazy: nothing until the first command
        for i in range(15):
            assert t.run(["echo", str(i)], timeout_s=20).stdout == f"{i}\n"
        assert sshd.logins() == before + 1
        assert t.connections == 1
        t.close()  # closed (the CLI does this at exit); the next command connects again
        assert t.run(["true"], timeout_s=20).returncode == 0
        assert (sshd.logins(), t.connections) == (before + 2, 2)


def test_dropped_connection_is_outcome_unknown_and_reconnects(
    ssh_config: Path, tmp_path: Path
) -> None:
    """sshd's session process dies mid-command: like a timeout (sbatch may have queued the
    job), not a failure; the next command connects again."""
    server = SSHServer.start(tmp_path / "own-sshd")  # its own: this test kills its sessions
    server.known_hosts.write_text(server.known_hosts_line())
    try:
        with connect(server, ssh_config) as t:
            assert t.run(["true"], timeout_s=20).returncode == 0

            def kill_sessions() -> None:
                for pid in server.session_pids():
                    os.kill(pid, signal.SIGKILL)

            timer = threading.Timer(1.0, kill_sessions)
            timer.start()
            started = time.monotonic()
            with pytest.raises(ConnectionLost, match="dropped while sleep ran"):
                t.run(["sleep", "30"], timeout_s=40)
            timer.join()
            assert time.monotonic() - started < 10
            assert t.run(["echo", "again"], timeout_s=20).stdout == "again\n"
            assert t.connections == 2
    finally:
        server.stop()


def test_user_and_port_in_host(sshd: SSHServer, ssh_config: Path) -> None:
    host = f"{sshd.user}@127.0.0.1:{sshd.port}"
    options = {"key_filename": sshd.client_key, "known_hosts": sshd.known_hosts}
    with SSHTransport(host, user="nobody", ssh_config=ssh_config, **options) as t:  # type: ignore[arg-type]
        assert (t.target.user, t.target.port) == (sshd.user, sshd.port)
        assert t.run(["whoami"], timeout_s=20).stdout == f"{sshd.user}\n"


def test_unknown_host_key_is_refused_and_not_added(
    sshd: SSHServer, ssh_config: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = connect(sshd, ssh_config, known_hosts=empty)
    before = sshd.logins()
    with pytest.raises(UnknownHostKeyError) as caught:
        t.run(["true"], timeout_s=20)
    err = caught.value
    assert err.fingerprint == sshd.host_fingerprint()
    assert sshd.host_fingerprint() in err.message
    assert f"127.0.0.1:{sshd.port}" in err.message
    assert err.hint is not None
    assert f"ssh-keyscan -p {sshd.port} -t ed25519 127.0.0.1" in err.hint
    assert "admins publish" in err.hint
    assert empty.read_text() == ""
    assert sshd.logins() == before  # refused before logging in
    missing = tmp_path / "no" / "known_hosts"
    with pytest.raises(UnknownHostKeyError):
        connect(sshd, ssh_config, known_hosts=missing).run(["true"], timeout_s=20)
    assert not missing.exists() and not missing.parent.exists()


def test_changed_host_key_is_a_hard_failure(
    sshd: SSHServer, ssh_config: Path, tmp_path: Path
) -> None:
    other = keygen(tmp_path / "impostor")
    key_type, key = Path(f"{other}.pub").read_text().split()[:2]
    known = tmp_path / "known_hosts"
    text = f"# cluster host keys\n\n[127.0.0.1]:{sshd.port} {key_type} {key}\n"
    known.write_text(text)
    with pytest.raises(ChangedHostKeyError) as caught:
        connect(sshd, ssh_config, known_hosts=known).run(["true"], timeout_s=20)
    err = caught.value
    assert err.line == 3
    assert f"{known}:3" in err.message
    assert "CHANGED" in err.message
    assert sshd.host_fingerprint() in err.message
    assert fingerprint(Path(f"{other}.pub")) in err.message
    assert err.hint is not None and "ssh-keygen -R" in err.hint
    assert known.read_text() == text

    # Hashed names (HashKnownHosts yes) are matched too, and the line is still named.
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert "|1|" in known.read_text()
    with pytest.raises(ChangedHostKeyError) as caught:
        connect(sshd, ssh_config, known_hosts=known).run(["true"], timeout_s=20)
    assert caught.value.line is not None


def test_hashed_known_hosts_entry_is_accepted(
    sshd: SSHServer, ssh_config: Path, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("@cert-authority *.example.org ssh-ed25519 AAAA\n" + sshd.known_hosts_line())
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    with connect(sshd, ssh_config, known_hosts=known) as t:
        assert t.run(["true"], timeout_s=20).returncode == 0


def test_wrong_client_key_is_an_auth_error_with_hint(
    sshd: SSHServer, ssh_config: Path, tmp_path: Path
) -> None:
    wrong = keygen(tmp_path / "wrong_key")
    with pytest.raises(SSHAuthError) as caught:
        connect(sshd, ssh_config, key_filename=wrong).run(["true"], timeout_s=20)
    err = caught.value
    assert err.user == sshd.user
    assert f"{sshd.user}@127.0.0.1:{sshd.port}" in err.message
    assert str(wrong) in err.message
    assert err.hint is not None and "ssh-add" in err.hint and "--identity" in err.hint
    assert "PRIVATE KEY" not in err.message + err.hint


def test_missing_identity_file(sshd: SSHServer, ssh_config: Path, tmp_path: Path) -> None:
    with pytest.raises(SSHError, match=r"identity file .* does not exist"):
        connect(sshd, ssh_config, key_filename=tmp_path / "nope").run(["true"], timeout_s=20)


def test_refused_port_names_host_and_port(ssh_config: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = SSHTransport("127.0.0.1", port=port, ssh_config=ssh_config, known_hosts=tmp_path / "kh")
    with pytest.raises(SSHError, match=f"cannot connect to 127.0.0.1:{port}: connection refused"):
        t.run(["true"], timeout_s=10)


def test_ssh_config_alias(sshd: SSHServer, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        "Host login\n"
        "    HostName 127.0.0.1\n"
        f"    Port {sshd.port}\n"
        f"    User {sshd.user}\n"
        f"    IdentityFile {sshd.client_key}\n"
        "    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {sshd.known_hosts}\n"
        "    StrictHostKeyChecking no\n"  # ignored: unknown keys are always refused
    )
    with SSHTransport("login", ssh_config=config) as t:
        assert t.target.hostname == "127.0.0.1" and t.target.port == sshd.port
        assert t.run(["whoami"], timeout_s=20).stdout == f"{sshd.user}\n"
    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    config.write_text(
        config.read_text().replace(
            f"UserKnownHostsFile {sshd.known_hosts}", f"UserKnownHostsFile {unknown}"
        )
    )
    with pytest.raises(UnknownHostKeyError):
        SSHTransport("login", ssh_config=config).run(["true"], timeout_s=20)
    assert unknown.read_text() == ""


def test_proxy_jump(sshd: SSHServer, tmp_path: Path) -> None:
    """login is reached through a second sshd (the jump host), both host keys checked."""
    jump = SSHServer.start(tmp_path / "jump")
    try:
        known = tmp_path / "known_hosts"
        known.write_text(sshd.known_hosts_line() + jump.known_hosts_line())
        config = tmp_path / "ssh_config"
        config.write_text(
            "Host bastion\n"
            f"    HostName 127.0.0.1\n    Port {jump.port}\n    User {jump.user}\n"
            f"    IdentityFile {jump.client_key}\n"
            "Host login\n"
            f"    HostName 127.0.0.1\n    Port {sshd.port}\n    User {sshd.user}\n"
            f"    IdentityFile {sshd.client_key}\n"
            "    ProxyJump bastion\n"
        )
        before = sshd.logins()
        with SSHTransport("login", ssh_config=config, known_hosts=known) as t:
            for _ in range(3):
                assert t.run(["echo", "via jump"], timeout_s=20).stdout == "via jump\n"
        assert jump.logins() == 1
        assert sshd.logins() == before + 1

        known.write_text(sshd.known_hosts_line())  # the jump host's key is unknown now
        with pytest.raises(UnknownHostKeyError) as caught:
            SSHTransport("login", ssh_config=config, known_hosts=known).run(["true"], timeout_s=20)
        assert caught.value.port == jump.port
    finally:
        jump.stop()


def test_cli_prints_error_and_hint_for_an_unknown_host(sshd: SSHServer, tmp_path: Path) -> None:
    """`mt --host` with a host whose key is not known: `error:` + `hint:`, exit 1, no traceback."""
    home = Path(os.environ["MT_HOME"])
    home.mkdir(mode=0o700, exist_ok=True)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(
        f"Host login\n    HostName 127.0.0.1\n    Port {sshd.port}\n"
        f"    IdentityFile {sshd.client_key}\n    UserKnownHostsFile {empty}\n"
    )
    (home / "site.yaml").write_text(
        f"slurm:\n  ssh_config: {json.dumps(str(config))}\n  python: {json.dumps(sys.executable)}\n"
    )
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  - name: tiny\n    engine: llamacpp\n"
        "    weights: {source: /nonexistent/tiny.gguf}\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc.cli",
            "--host",
            "login",
            "-m",
            str(models),
            "submit",
            "tiny",
            "--backend",
            "slurm",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"error: login (root@127.0.0.1:{sshd.port}) is not a known host" in done.stderr
    assert sshd.host_fingerprint() in done.stderr
    assert "hint: compare SHA256:" in done.stderr
    assert empty.read_text() == ""

    bad = subprocess.run(
        [sys.executable, "-m", "hpc.cli", "--host", "bad host", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "--host" in bad.stderr
