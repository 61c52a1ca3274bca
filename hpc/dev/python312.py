"""Find a Python 3.12 interpreter for LlamaStack's venv (`make clients`, `.ci/run`).

LlamaStack 0.7 needs Python >= 3.12 (on 3.11 pip offers only <= 0.2.12); Debian 12's python3
is 3.11. Looked for as CI would: ``python3.12`` on PATH (a pyenv shim is there without being
runnable, so each candidate must answer), then pyenv's own versions. Prints the path, or
nothing (exit 1) when there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

_PROBE = "import sys; print(sys.version_info[:2] == (3, 12))"


def _runs_312(python: str) -> bool:
    try:
        done = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return False
    return done.returncode == 0 and done.stdout.strip() == "True"


def candidates() -> list[str]:
    """Where a 3.12 may be: PATH first, then pyenv's versions (newest first)."""
    found = [p for p in [shutil.which("python3.12")] if p]
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found += [str(p) for p in sorted(root.glob("3.12*/bin/python3.12"), reverse=True)]
    return found


def find() -> str | None:
    """The first candidate that runs and is 3.12, or None."""
    return next((p for p in candidates() if _runs_312(p)), None)


def main() -> int:
    """Print the interpreter's path; exit 1 (printing nothing) if there is none."""
    python = find()
    if python is None:
        return 1
    sys.stdout.write(python + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
