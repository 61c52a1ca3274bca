"""A small real filesystem for fault tests: a tmpfs mounted by the test (root only), which
the test can fill (ENOSPC) or remount read-only (EROFS) under the code it runs."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc.privatefile import make_private_dir


@contextlib.contextmanager
def mounted(path: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` (mode 0700) at ``path`` until the block ends."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    make_private_dir(path)  # parents too: it may be under MT_HOME, which must stay 0700
    options = f"size={size},mode=0700"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> None:
    """Write into ``directory`` until its filesystem is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)


def remount_read_only(path: Path) -> None:
    """The filesystem at ``path`` becomes read-only."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
