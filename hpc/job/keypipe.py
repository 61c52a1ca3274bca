"""Hands an engine its key as a file it reads once, with no file on disk: a pipe at /dev/fd/N.

``python -m hpc.job.keypipe ENV FD -- ENGINE ARGS…`` takes the key from the environment
variable ``ENV`` (visible only to this user and root, in ``/proc/PID/environ``), writes it
into a pipe whose read end becomes descriptor ``FD``, removes ``ENV`` from the environment,
and ``exec``s the engine, which reads the key from ``/dev/fd/FD`` (llama-server's
``--api-key-file /dev/fd/FD``). So the key is never in argv (which every user of the node
can read in ``ps``), never in the engine's environment, and never in a file that a killed
job could leave behind: it lives in the pipe until the engine has read it.

``exec`` keeps the pid, the process group, the blocked TERM and the parent-death signal
the wrapper gave this process (hpc.job.proctree), so the engine is what the wrapper started.
"""

from __future__ import annotations

import os
import sys

ENV = "MT_ENGINE_KEY"
FD = 3


def keypipe_argv(python: str, argv: list[str], *, env: str = ENV, fd: int = FD) -> list[str]:
    """``argv`` run through this module: the key in ``env`` reaches it as ``/dev/fd/<fd>``."""
    return [python, "-m", "hpc.job.keypipe", env, str(fd), "--", *argv]


def key_path(fd: int = FD) -> str:
    """The path the engine reads its key from."""
    return f"/dev/fd/{fd}"


def main(argv: list[str] | None = None) -> int:
    """Move the key from the environment into a pipe at descriptor FD, then exec the engine."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 4 or args[2] != "--":
        print("usage: python -m hpc.job.keypipe ENV FD -- ENGINE [ARGS…]", file=sys.stderr)
        return 2
    env_name, fd, command = args[0], int(args[1]), args[3:]
    key = os.environ.pop(env_name, None)
    if not key:
        print(f"keypipe: {env_name} is not set", file=sys.stderr)
        return 2
    read_end, write_end = os.pipe()
    # A key is a few dozen bytes, far below a pipe's buffer: this write never blocks.
    os.write(write_end, key.encode() + b"\n")
    os.close(write_end)
    if read_end != fd:
        os.dup2(read_end, fd)  # dup2's copy is inheritable
        os.close(read_end)
    else:
        os.set_inheritable(fd, True)
    try:
        os.execvp(command[0], command)  # noqa: S606 - the engine's own argv, no shell
    except OSError as exc:
        print(f"keypipe: cannot start {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main())
