"""The one rule for private files: `mt` refuses what other users could read or change.

``$MT_HOME``, the registry directory, every record (it holds its job's key), keys.yaml and
the on-demand state file must belong to the user running `mt` and carry no group or other
permission bits: directories 0700, files 0600 (the modes ``hpc.privatefile`` creates them
with). Like Jupyter's ``secure_write``, but refusing rather than fixing: a file that was
readable may already have been read, so the user decides (the error names the path, its
mode and the ``chmod`` that fixes it).

``MT_ALLOW_INSECURE_PERMISSIONS=1`` is the only bypass; whoever uses it prints
:func:`warning_line` for every path it let through, on every run. The library never prints:
:func:`enforce` returns the paths it let through, the caller says so.

Symbolic links are followed (``stat``): what matters is the file the link leads to, and a
link's own mode means nothing on Linux. The fix names that target, since ``chmod -R`` does
not follow a link given on its command line. Who may replace the link itself is its
directory's business: that directory is one of the paths checked (or the user's own).
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hpc.errors import MTError

ALLOW_ENV = "MT_ALLOW_INSECURE_PERMISSIONS"
RECORD_SUFFIX = ".json"


@dataclass(frozen=True)
class Exposure:
    """A private path that another user could read or change: what is wrong and the fix."""

    path: Path
    target: Path  # the file the path leads to (itself unless it is a symbolic link)
    mode: int  # the permission bits, e.g. 0o755
    is_dir: bool
    owner: int  # its owner's uid

    @property
    def foreign(self) -> bool:
        """Owned by another user: chmod cannot make it ours."""
        return self.owner != os.geteuid()

    def describe(self) -> str:
        """``/x/mt (directory, mode 0755; want 0700)``, naming the link's target if any."""
        kind = "directory" if self.is_dir else "file"
        where = str(self.path) if self.target == self.path else f"{self.path} -> {self.target}"
        if self.foreign:
            return f"{where} ({kind}, owned by {_user(self.owner)}, not by you)"
        return f"{where} ({kind}, mode {self.mode:04o}; want {0o700 if self.is_dir else 0o600:04o})"

    def fix(self) -> str:
        """The command that makes it private again: chmod; another user's file is moved
        aside (chmod cannot make it ours); another user's directory is not used at all."""
        quoted = shlex.quote(str(self.target))
        if self.foreign and self.is_dir:
            return f"use a directory of your own instead of {quoted} (MT_HOME, registry_dir)"
        if self.foreign:
            return f"mv {quoted} {quoted}.not-mine"
        return f"chmod {700 if self.is_dir else 600} {quoted}"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class InsecurePermissionsError(MTError):
    """A private path is group/world-accessible or another user's: run the hint's chmod.

    Private: ``$MT_HOME``, the registry, a record, keys.yaml, the on-demand state file. Only
    ``MT_ALLOW_INSECURE_PERMISSIONS=1`` bypasses the check, with a warning every run.
    """

    def __init__(self, exposures: Sequence[Exposure]) -> None:
        # One line per path: `error:   /x/mt (directory, mode 0755; want 0700)`.
        paths = "\n".join(f"  {exposure.describe()}" for exposure in exposures)
        super().__init__(
            f"refusing to use files other users can read or change:\n{paths}",
            hint=fixes(exposures),
        )
        self.exposures = tuple(exposures)
        self.path = exposures[0].path


def exposure(path: Path, info: os.stat_result | None = None) -> Exposure | None:
    """What is wrong with ``path`` (None if it is private, or absent).

    ``info`` is the caller's ``stat``/``fstat`` of it, if it has one (an open record).
    """
    if info is None:
        try:
            info = path.stat()  # follows links: the target is what others could read
        except FileNotFoundError:
            return None
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == os.geteuid() and not mode & 0o077:
        return None
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    return Exposure(path, target, mode, stat.S_ISDIR(info.st_mode), info.st_uid)


def records_in(registry_dir: Path) -> list[Path]:
    """The record files of a registry (tmp and lock files are not records)."""
    try:
        names = sorted(os.listdir(registry_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [
        registry_dir / name
        for name in names
        if name.endswith(RECORD_SUFFIX) and not name.startswith(".")
    ]


def allowed(environ: Mapping[str, str] | None = None) -> bool:
    """True if the user set ``MT_ALLOW_INSECURE_PERMISSIONS=1``."""
    env = os.environ if environ is None else environ
    return env.get(ALLOW_ENV) == "1"


def enforce(paths: Iterable[Path], environ: Mapping[str, str] | None = None) -> list[Exposure]:
    """Refuse (InsecurePermissionsError) if any of ``paths`` is exposed, unless the bypass
    is set; returns what the bypass let through, for the caller to warn about."""
    found = [e for path in dict.fromkeys(paths) if (e := exposure(path)) is not None]
    if found and not allowed(environ):
        raise InsecurePermissionsError(found)
    return found


def check_open(path: Path, info: os.stat_result, environ: Mapping[str, str] | None = None) -> None:
    """:func:`enforce` for a file the caller has open (``os.fstat`` of its descriptor)."""
    found = exposure(path, info)
    if found is not None and not allowed(environ):
        raise InsecurePermissionsError([found])


def warning_line(exposure: Exposure) -> str:
    """The line printed, every run, for each path the bypass lets through."""
    return f"warning: {ALLOW_ENV}=1: using {exposure.describe()}, which other users can reach"


def fixes(exposures: Sequence[Exposure]) -> str:
    """The commands that fix them all: ``chmod -R go-rwx DIR`` for a directory whose
    contents are exposed too, else one ``chmod`` per path."""
    commands: list[str] = []
    covered: set[Path] = set()
    for exposure in exposures:
        if exposure.path in covered:
            continue
        inside = [
            other
            for other in exposures
            if other is not exposure and not other.foreign and exposure.path in other.path.parents
        ]
        if exposure.is_dir and not exposure.foreign and inside:
            commands.append(f"chmod -R go-rwx {shlex.quote(str(exposure.target))}")
            covered.update(other.path for other in inside)
        else:
            commands.append(exposure.fix())
    return "; ".join(commands)
