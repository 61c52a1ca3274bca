"""The open-file limit, checked (and raised if it can be) when the gateway starts.

Every proxied stream holds two sockets (the client's and the upstream's), plus the pooled
keep-alive connections, the registry files being read and the log. A soft ``RLIMIT_NOFILE``
of 1024 — the default on many login nodes — turns a burst of a few hundred streams into
``OSError: [Errno 24] Too many open files`` in the middle of requests. At start the gateway
raises its soft limit to the hard one (any process may), and warns, naming the numbers and
the fix, when even that is below what its concurrency caps could need. The limit it ends
with also sets the default cap on client connections (``connection_cap``), so a flood of
connections is refused with 503 before ``accept`` starts failing.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# Per request in flight: the client's socket and the upstream's; plus a margin for the
# listening socket, the session's idle pool, probes, files and the interpreter itself.
FDS_PER_REQUEST = 2
FD_MARGIN = 128
# What "no cap" is sized for: the gateway's own default for a busy group.
UNCAPPED_REQUESTS = 1024
# The connection cap when the open-file limit is unlimited (not possible on Linux).
UNLIMITED_CONNECTIONS = 1 << 20


@dataclass(frozen=True)
class FdLimit:
    """What the check found: the soft limit before and after, and what is needed."""

    before: int
    after: int
    hard: int
    needed: int
    connections: int  # client connections the soft limit allows, each one proxying a stream

    @property
    def enough(self) -> bool:
        """True if the soft limit now covers the need."""
        return self.after >= self.needed

    def warning(self) -> str | None:
        """A message naming the numbers and the fix, or None when the limit is enough."""
        if self.enough:
            return None
        return (
            f"open-file limit {self.after} (hard {self.hard}) is below the {self.needed} the "
            f"gateway may need at its concurrency cap; streams beyond it fail with 'Too many "
            f"open files'. hint: raise it (ulimit -n {self.needed}, or LimitNOFILE= in the "
            f"systemd unit), or lower --max-in-flight"
        )


def needed_fds(max_in_flight: int | None) -> int:
    """File descriptors for ``max_in_flight`` requests at once (None: no cap set)."""
    return FDS_PER_REQUEST * (max_in_flight or UNCAPPED_REQUESTS) + FD_MARGIN


def ensure_fd_limit(max_in_flight: int | None) -> FdLimit:
    """Raise the soft open-file limit toward the hard one if it is short; report the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = needed_fds(max_in_flight)
    after = soft
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            after = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ValueError, OSError):
            after = soft
    infinite = resource.RLIM_INFINITY
    return FdLimit(
        before=soft,
        after=needed if after == infinite else after,
        hard=needed if hard == infinite else hard,
        needed=needed,
        connections=UNLIMITED_CONNECTIONS if after == infinite else connection_cap(after),
    )


def connection_cap(open_files: int) -> int:
    """Client connections ``open_files`` can hold when every one proxies a stream (its own
    socket and the upstream's) after the margin: past it, a refusal beats running out."""
    return max(1, (open_files - FD_MARGIN) // FDS_PER_REQUEST)
