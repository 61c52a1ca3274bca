"""Where scheduler commands run: here (a subprocess) or on the login node over SSH.

One Protocol with one method, like httpx's transports. Commands are argv lists, never a
shell string; a timeout raises ``CommandTimeout`` (the caller treats it as "unknown", not as
failure), and a non-zero exit is returned, not raised: the Slurm client decides what it means.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class CommandResult:
    """What a command did: its argv, exit code, and output."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str = field(repr=False)


class CommandTimeout(Exception):
    """The command did not finish within its timeout; its outcome is unknown."""

    def __init__(self, argv: list[str], timeout_s: float) -> None:
        super().__init__(f"{' '.join(argv)} did not finish within {timeout_s:g}s")
        self.argv = argv
        self.timeout_s = timeout_s


class Transport(Protocol):
    """Runs one command and returns its result."""

    def run(self, argv: list[str], *, stdin: str | None = None, timeout_s: float) -> CommandResult:
        """Run ``argv`` (feeding ``stdin``), wait at most ``timeout_s``."""
        ...


class LocalTransport:
    """Runs commands on this machine (mt on the login node itself)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)

    def run(self, argv: list[str], *, stdin: str | None = None, timeout_s: float) -> CommandResult:
        """Run ``argv`` as a subprocess; FileNotFoundError if the command is not installed."""
        try:
            done = subprocess.run(
                argv,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(argv, timeout_s) from exc
        return CommandResult(argv, done.returncode, done.stdout, done.stderr)
