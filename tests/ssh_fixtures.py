"""pytest plugin: the session's real sshd on loopback as the ``sshd`` fixture.

Registered from tests/conftest.py with ``from ssh_fixtures import sshd  # noqa: F401``
(tests/ is on ``sys.path``, see tests/slurm_fixtures.py). Without openssh-server or root
the fixture skips, saying why; with ``ssh`` in ``MT_TEST_REQUIRE`` it fails instead.
``MT_TEST_REQUIRE`` is read when this module is imported, before tests/conftest.py's
autouse fixture clears ``MT_*`` from the environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from realparts import missing_part
from sshd import SSHServer, SSHServerError


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A running sshd on 127.0.0.1, stopped (with its sessions) after the session.

    ``sshd.known_hosts`` holds its host key as ``[127.0.0.1]:PORT ssh-ed25519 …``;
    ``sshd.client_key`` logs in as ``sshd.user``.
    """
    reason = SSHServer.available()
    if reason is not None:
        missing_part("ssh", reason)
    try:
        server = SSHServer.start(tmp_path_factory.mktemp("sshd"))
    except SSHServerError as exc:
        pytest.fail(f"the test sshd did not start: {exc}")
    try:
        server.known_hosts.write_text(server.known_hosts_line())
        yield server
    finally:
        server.stop()
