"""The soak's tunnels: a real sshd on loopback (the tests' tests/sshd.py, from the source
tree), and one foreground ``mt tunnel`` per world to its gateway, through which one more
client streams. The ``tunnel-drop`` fault kills sshd's session processes (the link drops,
the server stays): the tunnel must answer 503 while it is down and come back by itself.

Developer-only, like bench/privatecluster.py: root, openssh-server installed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.chaos.world import World, free_port
from hpc.ownerkey import owner_key_path


@dataclass
class Tunnel:
    """One world's ``mt tunnel`` (its engine, its local port, its process)."""

    engine: str
    local_port: int
    proc: subprocess.Popen[str]
    log: Path


@contextlib.contextmanager
def login_server(root: Path) -> Iterator[Any]:
    """The tests' real sshd on 127.0.0.1, with a known_hosts file and an ssh config."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from sshd import SSHServer  # type: ignore[import-not-found,unused-ignore]

    reason = SSHServer.available()
    if reason is not None:
        raise SystemExit(f"cannot start sshd for the tunnels: {reason}")
    server = SSHServer.start(root / "sshd")
    try:
        server.known_hosts.write_text(server.known_hosts_line())
        yield server
    finally:
        server.stop()


def ssh_config(server: Any, path: Path) -> Path:
    """``Host login`` for the tunnels (nothing from the runner's own ssh config)."""
    path.write_text(
        "Host login\n"
        f"    HostName 127.0.0.1\n    Port {server.port}\n    User {server.user}\n"
        f"    IdentityFile {server.client_key}\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {server.known_hosts}\n    GlobalKnownHostsFile /dev/null\n",
        encoding="utf-8",
    )
    return path


def open_tunnel(world: World, engine: str, config: Path, timeout_s: float = 60) -> Tunnel:
    """``mt tunnel login`` to the world's gateway port; returns once it is up."""
    port = free_port()
    log = world.root / f"tunnel-{engine}.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpc.cli",
            "tunnel",
            "login",
            *("--engine", engine, "--ssh-config", str(config)),
            *("--local-port", str(port), "--remote-port", str(world.port), "--keepalive", "1"),
            # The key to a 0600 file, not stdout, which goes to the log (audited for keys).
            *("--owner-key", str(owner_key_path(world.home))),
            *("--env-file", str(world.root / f"tunnel-{engine}.env")),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=world.env,
    )
    up = threading.Event()

    def pump() -> None:
        with log.open("a", encoding="utf-8") as out:
            for line in proc.stdout or ():
                out.write(line)
                out.flush()
                if "tunnel up:" in line:
                    up.set()

    threading.Thread(target=pump, daemon=True).start()
    if not up.wait(timeout_s):
        proc.kill()
        raise RuntimeError(f"mt tunnel ({engine}) did not come up: see {log}")
    return Tunnel(engine, port, proc, log)


def close_tunnel(tunnel: Tunnel) -> None:
    """SIGTERM the tunnel and wait; kill what lingers (counted by the audit first)."""
    children = []
    with contextlib.suppress(psutil.Error):
        children = psutil.Process(tunnel.proc.pid).children(recursive=True)
    tunnel.proc.send_signal(signal.SIGTERM)
    try:
        tunnel.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        tunnel.proc.kill()
        tunnel.proc.wait()
    psutil.wait_procs(children, timeout=5)


def drop_links(server: Any) -> int:
    """Kill every sshd session process (each login's connection); how many."""
    sessions = [psutil.Process(pid) for pid in server.session_pids() if psutil.pid_exists(pid)]
    for proc in sessions:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(sessions, timeout=5)
    time.sleep(0.1)
    return len(sessions)
