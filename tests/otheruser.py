"""The second Unix user: the attacker's side of a cross-user test, run as another uid.

The threat model (docs/security.md) is another user of the same machine: one who can list
processes, read what is group/world-readable, and connect to any port. Tests play that user
for real: as root, they run commands as an unprivileged user (``mtother``, created by
``.ci/run``; ``MT_TEST_OTHER_USER`` names another) through ``runuser -u USER --``.

That user cannot read the repository's venv or a test's ``tmp_path`` (``/tmp/pytest-of-root``
is 0700), so its Python is ``/usr/bin/python3`` with the standard library only, and its code
is passed on the command line (``python``) or in a file it can read (``spawn``).

    def test_x(other_user: OtherUser) -> None:
        result = other_user.run(["ps", "-eo", "args"])
        assert KEY not in result.stdout
        result = other_user.python("import sys; print(open(sys.argv[1]).read())", path)
        assert result.rc != 0 and "Permission denied" in result.stderr
        with other_user.spawn(SQUAT_CODE, str(port)) as squatter:
            ...  # the attacker runs meanwhile; squatter.output() is what it wrote

Without root or the user, the fixture skips (or fails, with ``otheruser`` in
``MT_TEST_REQUIRE``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

DEFAULT_USER = "mtother"
# Read at import, before tests/conftest.py's autouse fixture clears MT_* (as realparts.py).
USER_NAME = os.environ.get("MT_TEST_OTHER_USER") or DEFAULT_USER
PYTHON = "/usr/bin/python3"
# The other user's environment: nothing of ours (no MT_HOME, no keys, no SLURM_CONF unless
# a test passes it), a PATH with the system's tools.
_BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class Result:
    """What a command run as the other user did."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str


def unavailable(user: str) -> str | None:
    """Why commands cannot run as ``user`` here, or None if they can."""
    if os.geteuid() != 0:
        return "the tests do not run as root (runuser needs it)"
    if shutil.which("runuser") is None:
        return "runuser is not installed (util-linux)"
    if not Path(PYTHON).exists():
        return f"{PYTHON} is missing"
    try:
        pwd.getpwnam(user)
    except KeyError:
        return f"no user {user!r} (.ci/run creates it: useradd --system mtother)"
    return None


class Spawned:
    """A long-running process of the other user; what it printed is in a file we read.

    Its stdout and stderr go to a file owned by root, so the attacker cannot tamper with the
    record of what it saw. ``proc`` is runuser (root), whose child is the other user's
    process; both are in a session of their own, killed together when the ``with`` ends.
    """

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, workdir: Path) -> None:
        self.proc = proc
        self.log = log
        self._workdir = workdir

    def output(self) -> str:
        """Everything it has written so far (stdout and stderr together)."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, text: str, timeout_s: float = 10.0) -> str:
        """Wait until its output contains ``text``; the output; AssertionError on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from the other user's process: {self.output()!r}")

    def stop(self) -> int | None:
        """Kill it (its whole process group); its exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> Spawned:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class OtherUser:
    """Runs commands as an unprivileged second user (see the module docstring)."""

    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name = name
        self.uid = entry.pw_uid
        self.gid = entry.pw_gid

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as the other user would run it (for Popen of your own)."""
        return ["runuser", "-u", self.name, "--", *argv]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The other user's environment: the system PATH, plus ``extra`` (e.g. SLURM_CONF)."""
        return {**_BASE_ENV, "HOME": "/", **(extra or {})}

    def run(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout_s: float = 60.0,
        input_text: str | None = None,
    ) -> Result:
        """Run ``argv`` as the other user (cwd ``/``) and wait; never raises on a non-zero rc."""
        full = self.argv(argv)
        done = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            cwd="/",
            env=self.env(env),
            timeout=timeout_s,
            check=False,
        )
        return Result(list(argv), done.returncode, done.stdout, done.stderr)

    def python(
        self, code: str, *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> Result:
        """Run stdlib-only Python ``code`` (``sys.argv[1:]`` is ``args``) as the other user."""
        return self.run([PYTHON, "-I", "-c", code, *args], env=env, timeout_s=timeout_s)

    def spawn(self, code: str, *args: str, env: dict[str, str] | None = None) -> Spawned:
        """Start stdlib-only Python ``code`` as the other user and return at once.

        For an attacker that runs beside the test: a port squatter, a listener that logs
        every byte it receives. Print with ``flush=True`` (or run unbuffered: it is) to make
        lines visible to :meth:`Spawned.output` at once. Use it as a context manager.
        """
        workdir = Path(tempfile.mkdtemp(prefix="mt-other-"))
        workdir.chmod(0o711)  # the other user may enter, not list; the script is 0644
        script = workdir / "attacker.py"
        script.write_text(code, encoding="utf-8")
        script.chmod(0o644)
        log = workdir / "output.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.argv([PYTHON, "-I", "-u", str(script), *args]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=self.env(env),
                start_new_session=True,
            )
        return Spawned(proc, log, workdir)


def other_user_or_reason() -> tuple[OtherUser | None, str]:
    """The other user, or None and why not (the fixture skips or fails with it)."""
    reason = unavailable(USER_NAME)
    if reason is not None:
        return None, reason
    return OtherUser(USER_NAME), ""
