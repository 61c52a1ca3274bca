"""PNG charts of a run: throughput vs. concurrency, latency percentiles vs. concurrency.

matplotlib is optional (``pip install 'modeltainer[bench]'``) and drawn with the Agg
backend: no display is needed on a login node.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.metrics import LevelSummary, Percentiles
from hpc.errors import MTError

THROUGHPUT_PNG = "throughput.png"
LATENCY_PNG = "latency.png"


def write_plots(out_dir: Path, summaries: Sequence[LevelSummary]) -> list[Path]:
    """Draw both charts under ``out_dir``; returns their paths."""
    try:
        import matplotlib
    except ImportError as exc:
        raise MTError(
            "--plot needs matplotlib, which is not installed",
            hint="pip install 'modeltainer[bench]' (or run without --plot)",
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(dict.fromkeys(s.model for s in summaries))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for model in models:
        mine = [s for s in summaries if s.model == model]
        levels = [s.concurrency for s in mine]
        left.plot(levels, [s.output_tokens_per_s for s in mine], marker="o", label=model)
        right.plot(levels, [s.requests_per_s for s in mine], marker="o", label=model)
    for axis, title in ((left, "output tokens/s"), (right, "requests/s")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(visible=True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    throughput = out_dir / THROUGHPUT_PNG
    fig.savefig(throughput, dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (name, title) in zip(
        axes,
        (("ttft_ms", "TTFT (ms)"), ("itl_ms", "ITL (ms)"), ("e2e_ms", "end-to-end (ms)")),
        strict=True,
    ):
        for model in models:
            mine = [s for s in summaries if s.model == model]
            levels = [s.concurrency for s in mine]
            for quantile, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                values = [_get(getattr(s, name), quantile) for s in mine]
                axis.plot(levels, values, style, marker="o", label=f"{model} {quantile}")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(visible=True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.tight_layout()
    latency = out_dir / LATENCY_PNG
    fig.savefig(latency, dpi=100)
    plt.close(fig)
    return [throughput, latency]


def _get(values: Percentiles, quantile: str) -> float:
    value: float | None = getattr(values, quantile)
    return float("nan") if value is None else value
