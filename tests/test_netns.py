"""hpc.job.netns for real: an engine's loopback ports in a namespace of their own reach no one
on the node, while its Unix socket (a file) still serves; as root and as an ordinary user
(inside a user namespace mapping only that user). The real engines' own ports are checked
in tests/test_vllm.py (vLLM's dozen torch.distributed/gloo ports)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from otheruser import PYTHON, OtherUser

REPO = Path(__file__).resolve().parents[1]

# The "engine": listens on 127.0.0.1 (as vLLM's workers do) and on a Unix socket, reports
# its TCP port, its uid and its network namespace, then answers on the Unix socket.
ENGINE = textwrap.dedent(
    """
    import json, os, socket, sys
    tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen()
    unix = socket.socket(socket.AF_UNIX); unix.bind(sys.argv[1]); unix.listen()
    os.chmod(sys.argv[1], 0o777)
    print(json.dumps({"port": tcp.getsockname()[1], "uid": os.getuid(),
                      "netns": os.readlink("/proc/self/ns/net")}), flush=True)
    conn, _ = unix.accept(); conn.sendall(b"engine here"); conn.close()
    """
)


def _start(
    prefix: list[str], python: str, netns: list[str], socket_path: Path
) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``netns`` (the module, as the wrapper or as a script) starting ENGINE on ``socket_path``."""
    proc = subprocess.Popen(
        [*prefix, *netns, "isolated", "--", python, "-I", "-c", ENGINE, str(socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    seen: dict[str, Any] = json.loads(line)
    return proc, seen


def _check(proc: subprocess.Popen[str], seen: dict[str, Any], socket_path: Path, uid: int) -> None:
    try:
        assert seen["uid"] == uid  # no other uid: the user namespace maps only this one
        assert seen["netns"] != os.readlink("/proc/self/ns/net")
        with pytest.raises(ConnectionRefusedError):  # nothing there on the node's loopback
            socket.create_connection(("127.0.0.1", seen["port"]), timeout=5)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(socket_path))  # the file works across namespaces
        assert client.recv(100) == b"engine here"
        client.close()
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()


def test_as_root_the_engine_listens_on_a_loopback_of_its_own(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("the root path needs root (the other path is tested as the other user)")
    path = tmp_path / "engine.sock"
    proc, seen = _start([], sys.executable, [sys.executable, "-m", "hpc.job.netns"], path)
    _check(proc, seen, path, 0)


def test_as_an_ordinary_user_too(other_user: OtherUser, tmp_path: Path) -> None:
    # The module is stdlib only: the other user runs a copy of it as a script (this checkout
    # and its venv need not be readable to that user).
    work = Path(tempfile.mkdtemp(prefix="mt-netns-"))
    try:
        work.chmod(0o755)
        script = work / "netns.py"
        shutil.copy(REPO / "hpc" / "job" / "netns.py", script)
        script.chmod(0o644)
        os.chown(work, other_user.uid, other_user.gid)
        path = work / "engine.sock"
        netns = [PYTHON, "-I", str(script)]
        proc, seen = _start(other_user.argv([]), PYTHON, netns, path)
        _check(proc, seen, path, other_user.uid)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _refused(mode: str) -> subprocess.CompletedProcess[str]:
    """hpc.job.netns where the kernel refuses the namespace (as with user namespaces off)."""
    code = textwrap.dedent(
        f"""
        import sys
        from hpc.job import netns
        def refuse():
            raise netns.IsolationError(28, "No space left on device")
        netns.isolate = refuse
        sys.exit(netns.main([{mode!r}, "--", sys.executable, "-c", "print('engine ran')"]))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=30
    )


def test_isolated_refuses_to_start_the_engine_without_its_own_network() -> None:
    done = _refused("isolated")
    assert done.returncode == 1 and "engine ran" not in done.stdout
    assert "error: cannot give the engine a network of its own" in done.stderr
    assert "hint:" in done.stderr and "engine_network: shared" in done.stderr


def test_auto_runs_the_engine_and_says_it_shares_the_nodes_network() -> None:
    done = _refused("auto")
    assert done.returncode == 0 and done.stdout == "engine ran\n"
    assert done.stderr.startswith("warning: the engine runs on the node's network")


def test_a_real_kernel_refusal_is_reported_as_such() -> None:
    """No network namespace may be made (user.max_net_namespaces=0, set inside a user
    namespace of this test's own: the machine's limit stays): the kernel's own refusal."""
    script = (
        "echo 0 > /proc/sys/user/max_net_namespaces && "
        f"exec {sys.executable} -m hpc.job.netns isolated -- true"
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stderr
    assert "error: cannot give the engine a network of its own" in done.stderr, done.stderr
    assert "No space left on device" in done.stderr  # ENOSPC: the limit, from the kernel


def test_usage() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hpc.job.netns", "sometimes", "--", "true"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 2 and "usage:" in done.stderr
