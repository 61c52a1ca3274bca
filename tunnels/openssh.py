"""The OpenSSH engine: the laptop's own ssh, supervised and restarted.

The user's ssh does what it does best: ``~/.ssh/config`` in full, ProxyJump (``-J``), the
agent, 2FA prompts on the terminal, and a private ControlPath (a 0700 directory) so other
ssh commands to the login node ride on the tunnel's connection instead of asking again.
Every hop reads a private generated config (tunnels.sshcommand.ssh_config_text):
``ServerAliveInterval``/``CountMax`` (a dead link ends ssh within the keepalive window),
``StrictHostKeyChecking=yes`` unless ``accept_new`` (then ``accept-new``: added once, then
pinned; OpenSSH refuses a changed key either way), the flags' key and known_hosts.

Two steps, so that the local port is never unanswered: ``ssh -N -M`` logs in as a
ControlMaster (the control socket appears once it is authenticated), and only then
``ssh -O forward -L 127.0.0.1:LOCAL:127.0.0.1:REMOTE`` asks it to listen. Until that
moment the port may be held by the 503 responder (tunnels.outage), so a reconnect that
takes the whole connect timeout on a dead link still answers every request at once.

The master exiting is the drop signal. While it is down, the local port answers 503 and
ssh is started again after a bounded, jittered backoff, with ``BatchMode=yes``: a
reconnect that would need a password or 2FA fails as an authentication error and stops
instead of prompting in a loop. A failure of the first connection is never retried: it is
classified from ssh's stderr and raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections import deque

from hpc.errors import MTError, SSHAuthError, SSHError
from hpc.privatefile import write_private
from hpc.ssh.connection import SSHConnection
from tunnels.backoff import Backoff, permanent
from tunnels.base import Events, RemoteOutput, TunnelSpec, TunnelStatus
from tunnels.errors import LocalPortInUseError, TunnelDownError, TunnelError
from tunnels.localport import bind_local, ensure_free, holder_of, listening
from tunnels.outage import DownResponder
from tunnels.sshcommand import (
    config_includes,
    control_dir,
    forward_argv,
    remote_argv,
    ssh_argv,
    ssh_config_text,
)

_POLL_S = 0.1
_FIRST_LOGIN_S = 300.0  # a person may be typing a 2FA code
_STDERR_LINES = 40


def _die_with_parent() -> None:
    """preexec_fn (Linux): ssh gets SIGTERM if mt dies, so no forward outlives its owner."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class OpenSSHTunnel(TunnelStatus):
    """TunnelEngine over the system's ``ssh`` binary."""

    name = "openssh"

    def __init__(self, spec: TunnelSpec, events: Events) -> None:
        super().__init__()
        self.spec = spec
        self._events = events
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._responder: DownResponder | None = None
        private = control_dir()
        self.control_path = private / f"{spec.local_port}.ctl"  # one tunnel per local port
        self.config_path = private / f"{spec.local_port}.ssh_config"

    # -- TunnelEngine ------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The running ssh's process id."""
        return self._proc.pid if self._proc is not None else None

    def open(self) -> None:
        """Log in, then listen; a failure is raised, never retried."""
        ensure_free(self.spec.local_port)
        failure = self._start(batch=not sys.stdin.isatty(), wait_s=_FIRST_LOGIN_S)
        if failure is not None:
            raise failure
        self._state = "up"
        self._watcher = threading.Thread(target=self._watch, name="mt-tunnel-ssh", daemon=True)
        self._watcher.start()

    def close(self) -> None:
        """Stop ssh (TERM, then KILL) and release the port."""
        if self._state == "closed":
            return
        self._stop.set()
        self._terminate()
        self._release_port()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        self.config_path.unlink(missing_ok=True)
        if self._state != "failed":
            self._state = "closed"

    def run_remote(self, command: str, *, timeout_s: float) -> RemoteOutput:
        """A command through the master's control socket: no second login."""
        argv = remote_argv(
            self.spec, config=self.config_path, control_path=self.control_path, command=command
        )
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise TunnelError(
                f"ssh {self.spec.host} did not answer within {timeout_s:g}s",
                local_port=self.spec.local_port,
                hint=f"`ssh -S {self.control_path} {self.spec.host} true` shows where it waits",
            ) from exc
        err = done.stderr.decode("utf-8", "replace")
        if done.returncode == 255:  # ssh's own failure, not the command's
            tail = err.strip().splitlines()[-1:] or ["ssh exited with 255"]
            raise TunnelError(
                f"cannot run a command on {self.spec.host} over the tunnel: {tail[0]}",
                local_port=self.spec.local_port,
                hint="the login node's sshd must allow sessions (not only port forwarding)",
            )
        return RemoteOutput(done.returncode, done.stdout, err)

    # -- one ssh process ---------------------------------------------------------------
    def _start(self, *, batch: bool, wait_s: float) -> MTError | None:
        """Run the master until it is logged in, then forward (None), or the error."""
        self._stderr.clear()
        self.control_path.unlink(missing_ok=True)  # a stale socket would disable the master
        text = ssh_config_text(self.spec, batch=batch, includes=config_includes(self.spec))
        write_private(self.config_path, text.encode())
        argv = ssh_argv(self.spec, config=self.config_path, control_path=self.control_path)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - prctl only, no locks taken
            )
        except FileNotFoundError as exc:
            raise MTError("`ssh` is not installed here", hint="use `--engine paramiko`") from exc
        self._proc = proc
        reader = threading.Thread(target=self._read_stderr, args=(proc,), daemon=True)
        reader.start()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if proc.poll() is not None:
                reader.join(timeout=2)
                return self._classify(proc.returncode)
            if self.control_path.exists():  # made once the master is authenticated
                return self._forward()
            time.sleep(_POLL_S)
        self._terminate()
        return TunnelError(
            f"ssh to {self.spec.host} did not log in within {wait_s:g}s",
            local_port=self.spec.local_port,
            hint=f"`ssh -v {self.spec.host} true` shows where it waits",
        )

    def _forward(self) -> MTError | None:
        """Hand the local port from the 503 responder (if it holds it) to the master."""
        self._release_port()
        argv = forward_argv(self.spec, config=self.config_path, control_path=self.control_path)
        try:
            done = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
            )
        except subprocess.TimeoutExpired:
            done = None
        if done is not None and done.returncode == 0 and listening(self.spec.local_port):
            return None
        self._terminate()
        port = self.spec.local_port
        holder = holder_of(port)
        if holder is not None:
            return LocalPortInUseError(port, holder)
        said = done.stderr.decode("utf-8", "replace").strip() if done else "no answer in 30s"
        return TunnelError(
            f"ssh logged in to {self.spec.host} but could not listen on 127.0.0.1:{port}: {said}",
            local_port=port,
            hint="is the port taken? try another `--local-port`",
        )

    def _answer_down(self) -> None:
        """Hold the local port and answer 503 (unless something else took it meanwhile)."""
        if self._responder is None:
            message = f"the SSH tunnel to {self.spec.host} is down; reconnecting"
            with contextlib.suppress(TunnelError):
                self._responder = DownResponder(bind_local(self.spec.local_port), message)

    def _release_port(self) -> None:
        if self._responder is not None:
            self._responder.close()
            self._responder = None

    def _read_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        for raw in proc.stderr or ():
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self._stderr.append(line)

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _classify(self, code: int) -> MTError:
        """ssh's exit and stderr as the error a user can act on (the same as `mt --host`)."""
        text = "\n".join(self._stderr)
        tail = " / ".join(list(self._stderr)[-3:]) or f"ssh exited with {code}"
        port = self.spec.local_port
        if "Address already in use" in text and f":{port}" in text:
            return LocalPortInUseError(port, holder_of(port))
        if "Host key verification failed" in text or "HOST IDENTIFICATION HAS CHANGED" in text:
            return self._host_key_error(tail)
        if "Permission denied" in text and "keyboard-interactive" in text:
            return SSHAuthError(
                f"SSH login on {self.spec.host} failed: {tail}",
                host=self.spec.host,
                port=0,
                user="",
                hint="the server asks keyboard-interactive questions (a 2FA code, a "
                "password): run `mt tunnel` in the foreground on a terminal and type the "
                "answer when asked; a wrong answer ends the login (no second try)",
            )
        if "Permission denied" in text or "Too many authentication failures" in text:
            return SSHAuthError(
                f"SSH login on {self.spec.host} failed: {tail}",
                host=self.spec.host,
                port=0,
                user="",
                hint="load your key into the agent (`ssh-add ~/.ssh/id_ed25519`) or name it "
                f"with `--identity PATH`; `ssh -v {self.spec.host} true` shows which keys the "
                "server accepts",
            )
        return SSHError(
            f"ssh to {self.spec.host} failed: {tail}",
            host=self.spec.host,
            hint=f"`ssh -v {self.spec.host} true` shows where it fails",
        )

    def _host_key_error(self, tail: str) -> MTError:
        """OpenSSH does not print an unknown key's fingerprint: ask paramiko for the details."""
        probe = SSHConnection(
            self.spec.host,
            key_filename=self.spec.identity,
            known_hosts=self.spec.known_hosts,
            ssh_config=self.spec.ssh_config,
            connect_timeout_s=self.spec.connect_timeout_s,
            proxy_jump=self.spec.jump,
        )
        try:
            probe.transport()
        except SSHError as exc:
            if permanent(exc):
                return exc
        finally:
            probe.close()
        return SSHError(
            f"ssh refused the host key of {self.spec.host}: {tail}",
            host=self.spec.host,
            hint="check the key's fingerprint with your cluster's admins; `--accept-new` "
            "adds an unknown key once",
        )

    # -- keeping it up -----------------------------------------------------------------
    def _watch(self) -> None:
        backoff = Backoff(max_s=self.spec.backoff_max_s)
        while not self._stop.is_set():
            proc = self._proc
            if proc is None:
                return
            while proc.poll() is None and not self._stop.wait(_POLL_S):
                pass
            if self._stop.is_set():
                return
            self._answer_down()  # first: the port is free now that the master is gone
            self._state = "down"
            why = " / ".join(list(self._stderr)[-2:]) or f"ssh exited with {proc.returncode}"
            self._events(f"down: {why}; reconnecting")
            if not self._reconnect(backoff):
                return

    def _reconnect(self, backoff: Backoff) -> bool:
        while not self._stop.is_set():
            self._answer_down()  # again, if a failed forward gave the port up
            if self._stop.wait(backoff.next_s()):
                return False
            failure = self._start(batch=True, wait_s=self.spec.connect_timeout_s + 10)
            if failure is None:
                self._reconnects += 1
                self._state = "up"
                backoff.reset()
                self._events(f"up: reconnected to {self.spec.host}")
                return True
            if permanent(failure):
                self._error = TunnelDownError(
                    f"the tunnel to {self.spec.host} dropped and cannot reconnect: "
                    f"{failure.message}",
                    local_port=self.spec.local_port,
                    hint=failure.hint,
                )
                self._state = "failed"
                self._events(f"failed: {failure.message}")
                return False
            self._events(f"down: {failure.message}")
        return False
