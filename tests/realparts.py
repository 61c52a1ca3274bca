"""Real parts a test needs (llama.cpp, Slurm, sshd, Redis): skip without, fail if CI requires.

``MT_TEST_REQUIRE`` (comma-separated part names) is read when this module is first imported,
before tests/conftest.py's autouse fixture clears ``MT_*`` from each test's environment.
"""

from __future__ import annotations

import os

import pytest

REQUIRED = frozenset(
    p.strip() for p in os.environ.get("MT_TEST_REQUIRE", "").split(",") if p.strip()
)


def missing_part(part: str, why: str) -> None:
    """Skip the test because ``part`` is not here, or fail if MT_TEST_REQUIRE names it."""
    if part in REQUIRED:
        pytest.fail(f"{part} is required (MT_TEST_REQUIRE) but missing: {why}")
    pytest.skip(f"{part} not available: {why}")
