"""Two-factor logins (key, then a code at a keyboard-interactive prompt): both engines.

The login node is a real sshd asking, through PAM, for the key and then a one-time code
(tests/sshd.py, ``otp=``). A person at a terminal is a pseudo-terminal here: `mt tunnel`
runs with it as its controlling terminal and stdin/stdout/stderr, the test reads the
prompt from it and types the code. Without a terminal the login must fail at once, saying
why; a wrong code must end the login after one try (no loop against a 2FA prompt).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import SSHServer
from tunnelkit import free_port, get, run_tunnel, stop_tunnel, tunnel_argv, write_config

pytestmark = [pytest.mark.ssh, pytest.mark.timeout(120), pytest.mark.usefixtures("no_agent")]

ENGINES = ["openssh", "paramiko"]
CODE = "731904"


@pytest.fixture(scope="module")
def two_factor(tmp_path_factory: pytest.TempPathFactory, sshd: SSHServer) -> Iterator[SSHServer]:
    """A login node that wants the client key and then CODE (``sshd`` first: it skips/fails
    the same way when no sshd can run here)."""
    server = SSHServer.start(tmp_path_factory.mktemp("sshd-2fa"), otp=CODE)
    try:
        server.known_hosts.write_text(server.known_hosts_line())
        yield server
    finally:
        server.stop()


def _take_terminal() -> None:
    """preexec_fn: the pty on fd 0 becomes the controlling terminal (after setsid)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`mt tunnel` on a pseudo-terminal: what it shows, and a keyboard."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_take_terminal,  # noqa: PLW1509 - one ioctl, no locks taken
        )
        os.close(slave)
        self.screen = ""

    def wait_for(self, text: str, within_s: float = 60) -> bool:
        """Read until ``text`` shows (True) or the program ends or time runs out (False)."""
        deadline = time.monotonic() + within_s
        while text not in self.screen and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if not ready:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every holder of the terminal has exited
                return text in self.screen
            self.screen += chunk.decode("utf-8", "replace")
        return text in self.screen

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> None:
        stop_tunnel(self.proc)  # type: ignore[arg-type]
        with contextlib.suppress(OSError):
            os.close(self.master)


@contextlib.contextmanager
def on_terminal(argv: list[str]) -> Iterator[Terminal]:
    terminal = Terminal(argv)
    try:
        yield terminal
    finally:
        terminal.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_code_typed_on_the_terminal_opens_the_tunnel_unechoed(
    engine: str, two_factor: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", two_factor, two_factor.known_hosts)
    local_port = free_port()
    with on_terminal(tunnel_argv(engine, config, local_port, login_http)) as terminal:
        assert terminal.wait_for("Password:"), terminal.screen  # PAM's prompt, via the server
        terminal.type(CODE)
        assert terminal.wait_for("tunnel up:"), terminal.screen
        assert get(f"http://127.0.0.1:{local_port}/healthz")[0] == 200
        assert CODE not in terminal.screen  # read with echo off
    assert "Accepted keyboard-interactive/pam" in two_factor.log_text()


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_code_ends_the_login_after_one_try(
    engine: str, two_factor: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", two_factor, two_factor.known_hosts)
    log = two_factor.log_text()
    failed, connections = log.count("Failed keyboard-interactive"), log.count("Connection from")
    with on_terminal(tunnel_argv(engine, config, free_port(), login_http)) as terminal:
        assert terminal.wait_for("Password:"), terminal.screen
        terminal.type("000000")
        assert terminal.wait_for("error:"), terminal.screen
        assert terminal.proc.wait(timeout=30) == 1
        asked = len(re.findall(r"Password: *\r?\n", terminal.screen))
        assert asked == 1, terminal.screen  # one prompt, one answer, no second try
    assert "tunnel up:" not in terminal.screen
    # One answer was checked, and no second connection came to ask again.
    time.sleep(0.5)  # sshd logs the connection it served; none may follow
    log = two_factor.log_text()
    assert log.count("Failed keyboard-interactive") == failed + 1
    assert log.count("Connection from") == connections + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_no_terminal_is_a_clear_error_at_once(
    engine: str, two_factor: SSHServer, login_http: int, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ssh_config", two_factor, two_factor.known_hosts)
    connections = two_factor.log_text().count("Connection from 127.0.0.1")
    done = run_tunnel(engine, config, login_http)  # stdin is /dev/null, no terminal
    assert done.returncode == 1, done.stderr
    assert "error: SSH login" in done.stderr, done.stderr
    assert "keyboard-interactive" in done.stderr
    assert "hint:" in done.stderr and "Traceback" not in done.stderr
    assert "terminal" in done.stderr  # what to do instead
    time.sleep(0.5)  # sshd logs the connection it served; none may follow
    assert two_factor.log_text().count("Connection from 127.0.0.1") == connections + 1
