"""pyslurm.core.error: RPCError carries libslurm's errno and its message (slurm_strerror)."""

from __future__ import annotations

SLURM_ERROR = -1
ESLURM_INVALID_PARTITION_NAME = 2000
ESLURM_INVALID_JOB_ID = 2017
ESLURM_ALREADY_DONE = 2021
ESLURM_INVALID_GRES = 2072
SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT = 5004
ESLURM_DB_CONNECTION = 7000

# slurm_strerror() of the errnos above, as libslurm 22.05 on this machine answers them.
_STRERROR: dict[int, str] = {
    SLURM_ERROR: "Unspecified error",
    ESLURM_INVALID_PARTITION_NAME: "Invalid partition name specified",
    ESLURM_INVALID_JOB_ID: "Invalid job id specified",
    ESLURM_ALREADY_DONE: "Job/step already completing or completed",
    ESLURM_INVALID_GRES: "Invalid generic resource (gres) specification",
    SLURM_PROTOCOL_SOCKET_IMPL_TIMEOUT: "Socket timed out on send/recv operation",
    ESLURM_DB_CONNECTION: "Unable to connect to database",
}
ERRNO_BY_MESSAGE: dict[str, int] = {message: errno for errno, message in _STRERROR.items()}


def slurm_strerror(errno: int) -> str:
    """Convert a slurm errno to its message."""
    return _STRERROR.get(errno, f"Unknown error {errno}")


class PyslurmError(Exception):
    """Base of pyslurm's own errors."""


class RPCError(PyslurmError):
    """A Slurm RPC failed: ``errno`` and ``msg`` (slurm_strerror of errno unless given)."""

    def __init__(self, errno: int = SLURM_ERROR, msg: str | None = None) -> None:
        self.errno = errno
        self.msg = msg or slurm_strerror(errno)
        super().__init__(self.msg)
