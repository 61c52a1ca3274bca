"""Print pip's resolved install list without the CUDA stack, as ``name==version`` lines.

``make openwebui`` resolves Open WebUI with ``pip install --dry-run --report REPORT`` and
installs this file's output with ``--no-deps``: a plain install pulls a CUDA torch, triton
and ~19 nvidia wheels (several GB) that the tests never import (Open WebUI runs with
``RAG_EMBEDDING_ENGINE=openai``, so its local embedding code is never loaded).

Run only by that venv's Python (``python hpc/dev/without_cuda.py REPORT``): nothing in
ModelTainer imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_DROPPED = ("torch", "triton")
_DROPPED_PREFIXES = ("nvidia-", "cuda-")


def dropped(name: str) -> bool:
    """Whether a distribution belongs to the CUDA stack the install leaves out."""
    low = name.lower()
    return low in _DROPPED or low.startswith(_DROPPED_PREFIXES)


def requirements(report: dict[str, object]) -> list[str]:
    """The report's resolved distributions, pinned, without the CUDA stack."""
    install = report.get("install")
    if not isinstance(install, list):
        return []
    pins: list[str] = []
    for item in install:
        meta = item["metadata"]
        if not dropped(meta["name"]):
            pins.append(f"{meta['name']}=={meta['version']}")
    return pins


def main(argv: list[str]) -> int:
    report = json.loads(Path(argv[1]).read_text())
    print("\n".join(requirements(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
