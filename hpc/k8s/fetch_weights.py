"""Runs in the init container of every model pod: puts the weights on the volume.

Not imported by ModelTainer: its text goes into the model's ConfigMap and runs there with
only the standard library and ``huggingface_hub``. Settings come from the environment
(``MT_ENGINE``, ``MT_WEIGHTS_SOURCE``, ``MT_WEIGHTS_QUANT``, ``MT_WEIGHTS_REVISION``), never
from argv. The engine always reads the same path, whatever was fetched: a llama.cpp model
is ``/models/weights/model.gguf`` (a symlink to the one GGUF whose name contains the quant,
case ignored; the first part of a split GGUF), a vLLM model is ``/models/weights/model``
(a symlink to the snapshot directory). A repeat run finds the files in place and is quick.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _pick_gguf(names: list[str], quant: str) -> list[str]:
    """GGUF names matching ``quant`` (case ignored): all parts of the first match's group."""
    found = sorted(n for n in names if n.lower().endswith(".gguf") and quant.lower() in n.lower())
    if not found:
        return []
    # A split GGUF (name-00001-of-00003.gguf) is one model in several files: keep its siblings.
    stem = found[0].split("-00001-of-")[0]
    return [n for n in found if n.startswith(stem)]


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (a symlink renamed over the old one)."""
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)


def fetch(root: Path, engine: str, source: str, quant: str, revision: str | None) -> Path:
    """Fetch (or find) the weights under ``root`` and return the deterministic link."""
    root.mkdir(parents=True, exist_ok=True)
    link = root / ("model.gguf" if engine == "llamacpp" else "model")
    if source.startswith("/"):  # a path on a volume the pod already mounts
        path = Path(source)
        if engine == "llamacpp" and path.is_dir():
            picked = _pick_gguf(sorted(p.name for p in path.iterdir()), quant)
            if not picked:
                raise SystemExit(f"no GGUF matching {quant!r} in {path}")
            path = path / picked[0]
        _link(link, path)
        return link
    from huggingface_hub import HfApi, snapshot_download

    local = root / "hub" / source.replace("/", "--")
    if engine == "llamacpp":
        names = HfApi().list_repo_files(source, revision=revision)
        picked = _pick_gguf(names, quant)
        if not picked:
            raise SystemExit(f"no GGUF file matching {quant!r} in {source}")
        snapshot_download(source, revision=revision, local_dir=local, allow_patterns=picked)
        _link(link, local / picked[0])
    else:
        snapshot_download(source, revision=revision, local_dir=local)
        _link(link, local)
    return link


def main() -> int:
    """Read the settings from the environment and fetch."""
    env = os.environ
    link = fetch(
        Path(env.get("MT_WEIGHTS_DIR", "/models/weights")),
        env["MT_ENGINE"],
        env["MT_WEIGHTS_SOURCE"],
        env.get("MT_WEIGHTS_QUANT", ""),
        env.get("MT_WEIGHTS_REVISION") or None,
    )
    sys.stdout.write(f"weights ready: {link} -> {os.readlink(link)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
