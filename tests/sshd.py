"""A real OpenSSH server on 127.0.0.1 for tests, built in a temporary directory.

``SSHServer.start(base_dir)`` writes everything under ``base_dir`` and nothing elsewhere
(except ``/run/sshd``, the privilege-separation directory Debian's sshd is built to need):

* ``host_ed25519_key`` (+ ``.pub``): the server's own host key, made with ssh-keygen;
* ``client_key`` (+ ``.pub``): a client key, the only one in ``authorized_keys``;
* ``sshd_config``, ``sshd.pid`` and ``sshd.log`` (LogLevel VERBOSE: one ``Accepted
  publickey`` line per login, which is how tests count connections).

It runs ``/usr/sbin/sshd -D -E sshd.log -f sshd_config`` in the foreground as a child of
the caller (dying with it, via ``PR_SET_PDEATHSIG``) on a free port; ``stop()`` kills it
and every session process under it by pid. Root logs in with keys only
(``PermitRootLogin prohibit-password``); ``StrictModes no`` because the files live in a
temporary directory; ``UsePAM no``; TCP forwarding stays on, so one server can be another's
ProxyJump host. See /work/shared/TESTBED.md, "sshd on loopback".

``start(..., otp="123456")`` makes a two-factor server instead: the key and then a code
(``AuthenticationMethods publickey,keyboard-interactive``), asked through PAM as sites ask
for Duo or TOTP codes. Debian's sshd (9.2) has no ``PAMServiceName`` option: the PAM
service is the name sshd runs as, so sshd runs through a symlink ``mt-test-sshd-<id>`` in
``base_dir`` and its service file ``/etc/pam.d/mt-test-sshd-<id>`` (the one file written
outside ``base_dir``, removed by ``stop()``) asks with ``pam_exec expose_authtok``: PAM's
own ``Password:`` prompt, checked by a script against the code.
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SSHD = "/usr/sbin/sshd"
PAM_DIR = Path("/etc/pam.d")
PRIVSEP_DIR = Path("/run/sshd")
_PR_SET_PDEATHSIG = 1
_START_ATTEMPTS = 3


class SSHServerError(RuntimeError):
    """The test sshd could not be set up or started."""


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM this child when the thread that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def keygen(path: Path, comment: str = "mt-test") -> Path:
    """A fresh ed25519 key pair at ``path`` (and ``path.pub``) without a passphrase."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def fingerprint(public_key: Path) -> str:
    """The key's ``SHA256:…`` fingerprint, as ``ssh-keygen -l`` prints it."""
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(public_key)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


@dataclass
class SSHServer:
    """A running sshd on 127.0.0.1; build it with :meth:`start`."""

    root: Path
    port: int
    user: str
    popen: subprocess.Popen[bytes]
    address: str = "127.0.0.1"
    netns: str | None = None  # a network namespace (tests/netns.py) sshd runs in
    pam_service: Path | None = None  # /etc/pam.d/<name> of a two-factor server
    _stopped: bool = False

    @property
    def host_key(self) -> Path:
        """The server's public host key (``.pub``)."""
        return self.root / "host_ed25519_key.pub"

    @property
    def client_key(self) -> Path:
        """The private key that may log in (as :attr:`user`)."""
        return self.root / "client_key"

    @property
    def known_hosts(self) -> Path:
        """Where the ``sshd`` fixture writes :meth:`known_hosts_line` (and nothing else)."""
        return self.root / "known_hosts"

    @property
    def log(self) -> Path:
        """sshd's log file."""
        return self.root / "sshd.log"

    @property
    def pid(self) -> int:
        """The listening sshd's process id."""
        return self.popen.pid

    @staticmethod
    def available() -> str | None:
        """``None`` if a test sshd can run here, else the reason it cannot."""
        if not os.access(SSHD, os.X_OK):
            return f"{SSHD} not found (apt-get install openssh-server)"
        if shutil.which("ssh-keygen") is None:
            return "ssh-keygen not found (apt-get install openssh-client)"
        if os.geteuid() != 0:
            return "the test sshd runs as root (privilege separation, logins as root)"
        return None

    @classmethod
    def start(
        cls,
        base_dir: Path,
        *,
        timeout_s: float = 15.0,
        otp: str | None = None,
        address: str = "127.0.0.1",
        netns: str | None = None,
    ) -> SSHServer:
        """Generate keys and config under ``base_dir``, start sshd, wait for its banner.

        With ``otp``, a login needs the client key and then ``otp`` typed at a
        keyboard-interactive prompt (see the module docstring).
        """
        reason = cls.available()
        if reason is not None:
            raise SSHServerError(reason)
        base_dir.mkdir(parents=True, exist_ok=True)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        keygen(base_dir / "host_ed25519_key", "mt-test-host")
        keygen(base_dir / "client_key", "mt-test-client")
        (base_dir / "authorized_keys").write_text((base_dir / "client_key.pub").read_text())
        if otp is not None:
            _two_factor(base_dir, otp)
        for attempt in range(_START_ATTEMPTS):
            port = _free_port()
            server = cls._spawn(base_dir, port, address=address, netns=netns)
            try:
                server._wait_ready(timeout_s)
            except SSHServerError:
                server.stop()
                if "Address already in use" in server.log_text() and attempt + 1 < _START_ATTEMPTS:
                    continue  # someone took the port between choosing and binding it
                raise
            return server
        raise AssertionError("unreachable")

    @classmethod
    def _spawn(
        cls, root: Path, port: int, *, address: str = "127.0.0.1", netns: str | None = None
    ) -> SSHServer:
        two_factor = (root / "otp-check").exists()
        auth = (
            [
                "KbdInteractiveAuthentication yes",
                "AuthenticationMethods publickey,keyboard-interactive",
                "UsePAM yes",
                # With prohibit-password, sshd hands PAM a junk answer for root on purpose
                # ("\\b\\n\\r\\177INCORRECT"); the key is still required (above).
                "PermitRootLogin yes",
            ]
            if two_factor
            else [
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
            ]
        )
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    f"ListenAddress {address}",
                    f"HostKey {root / 'host_ed25519_key'}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    *auth,
                    "StrictModes no",
                    "AllowTcpForwarding yes",
                    "PrintMotd no",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        log = root / "sshd.log"
        log.unlink(missing_ok=True)
        program = root / f"mt-test-sshd-{root.name}-{os.getpid()}" if two_factor else None
        if program is not None:
            program.unlink(missing_ok=True)
            program.symlink_to(SSHD)  # the PAM service is the name sshd runs as
            (PAM_DIR / program.name).write_text(
                f"auth required pam_exec.so expose_authtok quiet {root / 'otp-check'}\n"
                "auth optional pam_permit.so\n"
                "account required pam_permit.so\n"
                "session required pam_permit.so\n"
            )
        inside = ["ip", "netns", "exec", netns] if netns else []  # `ip` execs sshd: same pid
        popen = subprocess.Popen(
            [*inside, str(program or SSHD), "-D", "-E", str(log), "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - PR_SET_PDEATHSIG only, no locks taken
        )
        pam = PAM_DIR / program.name if program is not None else None
        return cls(
            root=root,
            port=port,
            user=getpass.getuser(),
            popen=popen,
            address=address,
            netns=netns,
            pam_service=pam,
        )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise SSHServerError(
                    f"sshd exited with {self.popen.returncode}:\n{self.log_text()[-2000:]}"
                )
            if self._banner():
                return
            time.sleep(0.05)
        raise SSHServerError(f"sshd did not answer within {timeout_s:g}s:\n{self.log_text()}")

    def _banner(self) -> bool:
        """Whether our sshd (the process we started) answers with an SSH banner."""
        if self.netns is not None:
            # Neither psutil (it reads this namespace's /proc/net) nor a connection from
            # here (the address may be unreachable on purpose) can see it: sshd's log can.
            return f"Server listening on {self.address} port {self.port}." in self.log_text()
        try:
            conns = psutil.Process(self.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        if not any(c.status == psutil.CONN_LISTEN and c.laddr[1] == self.port for c in conns):
            return False
        try:
            with socket.create_connection((self.address, self.port), timeout=2) as s:
                return s.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    # -- use -------------------------------------------------------------------------------
    def known_hosts_line(self) -> str:
        """This server's line for a known_hosts file: ``[ADDRESS]:PORT ssh-ed25519 …``."""
        key_type, key = self.host_key.read_text().split()[:2]
        return f"[{self.address}]:{self.port} {key_type} {key}\n"

    def host_fingerprint(self) -> str:
        """The host key's ``SHA256:…`` fingerprint."""
        return fingerprint(self.host_key)

    def log_text(self) -> str:
        """Everything sshd has logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logins(self) -> int:
        """How many logins (authenticated connections) sshd has accepted so far."""
        text = self.log_text()
        return text.count("Accepted publickey for ") + text.count("Accepted keyboard-interactive")

    def commands(self) -> int:
        """How many commands (exec sessions) sshd has started so far."""
        return self.log_text().count("Starting session: command for ")

    def session_pids(self) -> list[int]:
        """Every process under this sshd: per-connection sshd and the commands they run."""
        try:
            return [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    # -- stop ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Kill sshd and its sessions by pid and wait for them. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        procs: list[psutil.Process] = []
        for pid in [self.pid, *self.session_pids()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                proc.kill()
                procs.append(proc)
        psutil.wait_procs(procs, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        if self.pam_service is not None:
            self.pam_service.unlink(missing_ok=True)


def _two_factor(root: Path, otp: str) -> None:
    """The script PAM runs to check the typed code (pam_exec passes it on stdin)."""
    (root / "otp").write_text(otp + "\n")
    check = root / "otp-check"
    check.write_text(
        "#!/bin/bash\n"
        "# pam_exec expose_authtok: the answer on stdin, without a newline\n"
        "IFS= read -r -d '' code || true\n"
        f'[ "$code" = "$(cat {shlex.quote(str(root / "otp"))})" ]\n'
    )
    check.chmod(0o755)
