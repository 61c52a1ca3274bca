"""The fake's stand-in for libslurm's RPCs (not a real pyslurm module): one Slurm command each.

A command's failure becomes the ``RPCError`` libslurm would have raised: Slurm's tools print
``<tool>: error: ...: <slurm_strerror(errno)>``, so the last part is the message and gives back
the errno. A command that does not answer in time is libslurm's socket timeout.
"""

from __future__ import annotations

import os
import subprocess

from pyslurm.core.error import (
    ERRNO_BY_MESSAGE,
    SLURM_ERROR,
    SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT,
    RPCError,
)

TIMEOUT_S = 30.0


def run(argv: list[str], *, stdin: str | None = None) -> str:
    """Run one Slurm command against the cluster SLURM_CONF names; its stdout, or RPCError."""
    # libslurm reads no SBATCH_* variables; sbatch would take them as options.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SBATCH_")}
    try:
        done = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RPCError(errno=SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT) from exc
    if done.returncode != 0:
        raise rpc_error(done.stderr)
    return done.stdout


def rpc_error(stderr: str) -> RPCError:
    """The RPCError for a tool's error output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line] or lines or ["Unspecified error"]
    message = errors[-1].rsplit(": ", 1)[-1]
    return RPCError(errno=ERRNO_BY_MESSAGE.get(message, SLURM_ERROR), msg=message)
