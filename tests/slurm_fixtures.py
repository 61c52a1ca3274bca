"""pytest plugin: the session's private Slurm cluster as the ``slurm_cluster`` fixture.

Register it from tests/conftest.py with ``pytest_plugins = ["slurm_fixtures"]`` or
``from slurm_fixtures import slurm_cluster  # noqa: F401``. tests/ has no ``__init__.py``:
pytest puts tests/ on ``sys.path`` for its conftest, so the module is importable as
``slurm_fixtures``; ``"tests.slurm_fixtures"`` fails with ``No module named 'tests'`` under
``.venv/bin/pytest`` (the repository root is not on ``sys.path``).

Without slurm-wlm/munge or root the fixture skips, saying why; with ``slurm`` in
``MT_TEST_REQUIRE`` it fails instead. ``MT_TEST_REQUIRE`` is read when this module is
imported, before tests/conftest.py's autouse fixture clears ``MT_*`` from the environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realparts import missing_part
from slurmcluster import SlurmCluster, SlurmClusterError


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running two-node cluster (gpu1, gpu2; 2 fake GPUs each), stopped after the session.

    Pass ``slurm_cluster.env`` to subprocesses (it sets ``SLURM_CONF``), or use
    ``slurm_cluster.run([...])``. Tests should ``slurm_cluster.cancel_all()`` when done so
    the next test finds idle nodes.
    """
    reason = SlurmCluster.available()
    if reason is not None:
        missing_part("slurm", reason)
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmClusterError as exc:
        pytest.fail(f"the private Slurm cluster did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmCluster]:
    """The session's cluster, reachable through SLURM_CONF; every job cancelled afterwards."""
    for name, value in slurm_cluster.env.items():
        if name.startswith("SLURM"):
            monkeypatch.setenv(name, value)
    yield slurm_cluster
    slurm_cluster.cancel_all()
