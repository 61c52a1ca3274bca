"""Backends behind one Protocol, registered by name in a plain dict."""

from __future__ import annotations

from collections.abc import Callable

from hpc.backends.base import (
    Backend,
    JobHandle,
    JobStatus,
    PoolBackend,
    SchedulerState,
    ScriptBackend,
)
from hpc.backends.kubernetes import KubernetesBackend
from hpc.backends.local import LocalBackend
from hpc.backends.slurm import SlurmBackend
from hpc.errors import UnknownBackendError
from hpc.site import Site

BackendFactory = Callable[[Site], Backend]

BACKENDS: dict[str, BackendFactory] = {
    "local": LocalBackend,
    "slurm": SlurmBackend,
    "kubernetes": KubernetesBackend,
}


def get_backend(name: str, site: Site) -> Backend:
    """The backend called ``name``, built for ``site``; an unknown name lists the known ones."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(name, list(BACKENDS)) from None
    return factory(site)


__all__ = [
    "BACKENDS",
    "Backend",
    "JobHandle",
    "JobStatus",
    "PoolBackend",
    "SchedulerState",
    "ScriptBackend",
    "get_backend",
]
