"""The tunnel engines by name (``openssh``, ``paramiko``), and ``auto``'s choice between them."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from hpc.errors import MTError
from tunnels.base import Events, TunnelEngine, TunnelSpec

EngineFactory = Callable[[TunnelSpec, Events], TunnelEngine]


# The engines are imported when one is made, not here: `mt` imports this registry for its
# help text, and every `mt` command would otherwise pay for loading paramiko.
def _openssh(spec: TunnelSpec, events: Events) -> TunnelEngine:
    from tunnels.openssh import OpenSSHTunnel

    return OpenSSHTunnel(spec, events)


def _paramiko(spec: TunnelSpec, events: Events) -> TunnelEngine:
    from tunnels.pyforward import ParamikoTunnel

    return ParamikoTunnel(spec, events)


ENGINES: dict[str, EngineFactory] = {"openssh": _openssh, "paramiko": _paramiko}


def choose(name: str) -> str:
    """The engine ``name`` stands for: ``auto`` is OpenSSH when ``ssh`` is on PATH."""
    if name == "auto":
        return "openssh" if shutil.which("ssh") else "paramiko"
    if name not in ENGINES:
        raise MTError(
            f"unknown tunnel engine {name!r}", hint=f"known engines: auto, {', '.join(ENGINES)}"
        )
    if name == "openssh" and not shutil.which("ssh"):
        raise MTError(
            "the openssh engine needs `ssh` on PATH",
            hint="install OpenSSH's client, or use `--engine paramiko`",
        )
    return name


def make_engine(name: str, spec: TunnelSpec, events: Events) -> TunnelEngine:
    """A new (not yet open) tunnel engine by name (``auto``, ``openssh``, ``paramiko``)."""
    return ENGINES[choose(name)](spec, events)
