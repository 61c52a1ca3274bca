"""Build llama.cpp's own ``llama-server`` once per machine: ``python -m hpc.dev.llama_server``.

What ``engine: llamacpp`` runs when neither the site (``llamacpp.server``) nor the PATH has a
``llama-server`` (hpc.llamacppserver): the llama.cpp tree that llama-cpp-python's sdist
vendors (``pip download`` fetches it from the package index, the one network this needs),
configured with CMake and built for its ``llama-server`` target only: about 5 minutes on 2
cores, a static 15 MB binary that needs libgomp, libssl and libstdc++. It lands in
:func:`hpc.llamacppserver.cached_build` (``~/.cache/modeltainer/llama-server-<version>-avx2``),
written beside it and renamed into place, so a cut-short build leaves nothing half-written.
``make llama-server`` (and ``make test``, ``make demo``) run this.

The flags: a portable AVX2 build, not ``-march=native`` (the native build enables AMX on
recent Xeons, where llama.cpp segfaults: upstream issue ggml-org/llama.cpp#20824), no shared
libraries, and no prebuilt web UI (by default the build downloads it from a hub).
Needs ``cmake`` and a C++ compiler (Debian: ``cmake g++``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from hpc.llamacppserver import BUILD_VERSION, cached_build

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
)
SDIST = f"llama-cpp-python=={BUILD_VERSION}"
_SOURCE = ("--no-binary", ":all:", SDIST, "-d")


def steps(work: Path, jobs: int) -> list[list[str]]:
    """The commands, in order, that build ``llama-server`` under ``work``."""
    tree = work / f"llama_cpp_python-{BUILD_VERSION}" / "vendor" / "llama.cpp"
    build = work / "build"
    return [
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *_SOURCE, str(work)],
        ["cmake", "-S", str(tree), "-B", str(build), *CMAKE_FLAGS],
        ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)],
    ]


def _run(argv: list[str], log: Path) -> None:
    with log.open("ab") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        sys.exit("\n".join([*tail, f"error: {shlex.join(argv)} failed ({done.returncode})"]))


def build(target: Path, jobs: int) -> None:
    """Download the sdist, build ``llama-server`` in a temporary directory, install it."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found\nhint: apt-get install cmake g++")
    with tempfile.TemporaryDirectory(prefix="mt-llama-server-") as tmp:
        work = Path(tmp)
        log = work / "build.log"
        download, configure, compile_ = steps(work, jobs)
        _run(download, log)
        with tarfile.open(work / f"llama_cpp_python-{BUILD_VERSION}.tar.gz") as sdist:
            sdist.extractall(work, filter="data")
        _run(configure, log)
        _run(compile_, log)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".tmp")
        shutil.copy2(work / "build" / "bin" / "llama-server", partial)
        os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    """Build unless already built; print the binary's path."""
    parser = argparse.ArgumentParser(prog="python -m hpc.dev.llama_server", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="default: ModelTainer's cache")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--force", action="store_true", help="rebuild even if it is there")
    parser.add_argument("--print", action="store_true", help="print the commands, build nothing")
    args = parser.parse_args(argv)
    target: Path = args.out or cached_build()
    if args.print:
        for step in steps(Path("$WORK"), args.jobs):
            print(" ".join(step))  # for reading: $WORK is a new temporary directory
        print(f"# then: $WORK/build/bin/llama-server -> {target}")
        return 0
    if target.is_file() and not args.force:
        print(target)
        return 0
    print(
        f"==> building llama.cpp's llama-server (llama-cpp-python {BUILD_VERSION}'s vendored "
        "tree): about 5 minutes on 2 cores, once",
        file=sys.stderr,
    )
    build(target, args.jobs)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
