"""Backends behind one Protocol (scheduler calls only), registered by name in a plain dict."""

from __future__ import annotations

from collections.abc import Callable

from hpc.backends.base import (
    Backend,
    Capabilities,
    JobHandle,
    JobRequest,
    JobStatus,
    Scheduler,
    SchedulerState,
    Submitted,
)
from hpc.backends.kubernetes import KubernetesBackend
from hpc.backends.local import LocalBackend
from hpc.backends.slurm import SlurmBackend
from hpc.errors import UnknownBackendError
from hpc.site import Site

SchedulerFactory = Callable[[Site], Scheduler]

BACKENDS: dict[str, SchedulerFactory] = {
    "local": LocalBackend,
    "slurm": SlurmBackend,
    "kubernetes": KubernetesBackend,
}


def get_scheduler(name: str, site: Site) -> Scheduler:
    """The backend called ``name``, built for ``site``; an unknown name lists the known ones."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UnknownBackendError(name, list(BACKENDS)) from None
    return factory(site)


__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "JobHandle",
    "JobRequest",
    "JobStatus",
    "Scheduler",
    "SchedulerState",
    "Submitted",
    "get_scheduler",
]
