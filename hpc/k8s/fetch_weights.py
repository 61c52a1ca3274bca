"""Runs in the init container of every model pod: puts the weights on the volume.

Not imported by ModelTainer: its text goes into the model's ConfigMap and runs there with
only the standard library, so any image with a Python 3 runs it and nothing is installed
when the pod starts. Settings come from the environment (``MT_ENGINE``,
``MT_WEIGHTS_SOURCE``, ``MT_WEIGHTS_QUANT``, ``MT_WEIGHTS_REVISION``, ``HF_TOKEN``,
``HF_ENDPOINT`` for a mirror), never from argv. The engine always reads the same path,
whatever was fetched: a llama.cpp model is ``/models/weights/model.gguf`` (a symlink to the
one GGUF whose name contains the quant, case ignored; the first part of a split GGUF), a
vLLM model is ``/models/weights/model`` (a symlink to the snapshot directory). A repeat run
finds the files in place and is quick.

The Hub is spoken to as its HTTP API documents it: the file list from
``/api/models/<repo>/revision/<revision>``, each file from
``/<repo>/resolve/<revision>/<file>``, following redirects by hand so that the token goes
to the Hub's own host only, never to the storage host it redirects to.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

_TIMEOUT_S = 60
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects come back as errors: :func:`_open` follows them itself."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _open(url: str) -> IO[bytes]:
    """GET ``url``; the token (``HF_TOKEN``) only to the Hub's host, through redirects."""
    hub = urllib.parse.urlsplit(_endpoint()).netloc
    token = os.environ.get("HF_TOKEN", "")
    for _hop in range(10):
        if urllib.parse.urlsplit(url).scheme not in ("https", "http"):  # no file: redirects
            raise SystemExit(f"{url}: not an http(s) URL")
        request = urllib.request.Request(url, headers={"User-Agent": "modeltainer-fetch"})  # noqa: S310 - scheme checked above
        if token and urllib.parse.urlsplit(url).netloc == hub:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            return _OPENER.open(request, timeout=_TIMEOUT_S)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            location = exc.headers.get("Location")
            if exc.code in _REDIRECTS and location:
                url = urllib.parse.urljoin(url, location)
                continue
            hint = " (a gated repo: create the Secret hf-token)" if exc.code in (401, 403) else ""
            raise SystemExit(f"{url}: HTTP {exc.code} {exc.reason}{hint}") from None
    raise SystemExit(f"{url}: too many redirects")


def list_files(repo: str, revision: str) -> list[str]:
    """The repository's file names at ``revision``."""
    quoted = urllib.parse.quote(revision, safe="")
    with _open(f"{_endpoint()}/api/models/{repo}/revision/{quoted}") as resp:
        info = json.load(resp)
    return sorted(str(s["rfilename"]) for s in info.get("siblings") or [])


def download(repo: str, revision: str, name: str, dest: Path) -> None:
    """One file to ``dest`` (skipped if there); written under ``.part`` and renamed."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    url = (
        f"{_endpoint()}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}/"
        f"{urllib.parse.quote(name)}"
    )
    with _open(url) as resp, part.open("wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)
    os.replace(part, dest)


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
    rev = revision or "main"
    local = root / "hub" / source.replace("/", "--")
    names = list_files(source, rev)
    if engine == "llamacpp":
        names = _pick_gguf(names, quant)
        if not names:
            raise SystemExit(f"no GGUF file matching {quant!r} in {source}")
    for name in names:
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts:  # the repo's names stay under local
            raise SystemExit(f"{source}: refusing the file name {name!r}")
        download(source, rev, name, local / name)
    _link(link, local / names[0] if engine == "llamacpp" else local)
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
