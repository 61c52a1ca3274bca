"""The tests' private two-node Slurm cluster, for benchmarks run on a machine without one.

Developer-only: it imports tests/slurmcluster.py from the source tree (root, slurm-wlm and
munge installed). On a real cluster, run the benchmarks without ``--private-cluster``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def private_cluster() -> Iterator[dict[str, str]]:
    """Start the cluster, point SLURM_CONF at it for this process, stop it afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from slurmcluster import SlurmCluster  # type: ignore[import-not-found,unused-ignore]

    reason = SlurmCluster.available()
    if reason is not None:
        raise SystemExit(f"cannot start the private cluster: {reason}")
    with tempfile.TemporaryDirectory(prefix="mt-bench-slurm-") as tmp:
        cluster = SlurmCluster.start(Path(tmp))
        old = dict(os.environ)
        os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("SLURM")})
        try:
            yield dict(cluster.env)
        finally:
            os.environ.clear()
            os.environ.update(old)
            cluster.stop()
