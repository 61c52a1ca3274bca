"""The same requests on several paths to one engine, in one session: tokens/s and TTFT.

Each round runs every level on every path, the paths' order rotating from round to round,
so drift in the engine's speed hits every path alike; the table has the median over rounds
of each level's output tokens/s and TTFT p50, and each path's ratio to the first (the
baseline). Used by bench.front_cost (engine socket vs. the job's front) and
bench.vllm_paths (engine, front, gateway on real vLLM).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.loadgen import Target, run_level
from bench.workload import Schedule, Workload


@dataclass
class PathRuns:
    """Every round's numbers for one path at one level."""

    tokens_per_s: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)

    def median_tokens_per_s(self) -> float:
        return statistics.median(self.tokens_per_s)

    def median_ttft_ms(self) -> float:
        return statistics.median(self.ttft_ms)


Runs = dict[tuple[str, int], PathRuns]


async def compare(
    paths: Mapping[str, tuple[aiohttp.ClientSession, Target]],
    workload: Workload,
    levels: Sequence[int],
    rounds: int,
    requests: int,
) -> Runs:
    """Run every level on every path, ``rounds`` times (see the module doc)."""
    names = list(paths)
    runs: Runs = {}
    for round_ in range(rounds):
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        for level in levels:
            schedule = Schedule(concurrency=(level,), requests=max(requests, level), warmup=1)
            for name in order:
                session, target = paths[name]
                result = await run_level(session, target, workload, schedule, level)
                summary = result.summaries[0]
                if summary.errors:
                    errors = [r.error for r in result.records if r.error]
                    raise SystemExit(f"{name} at {level}: {errors[:3]}")
                row = runs.setdefault((name, level), PathRuns())
                row.tokens_per_s.append(summary.output_tokens_per_s)
                row.ttft_ms.append(summary.ttft_ms.p50 or 0.0)
                print(
                    f"round {round_ + 1}/{rounds} c={level} {name}: "
                    f"{summary.output_tokens_per_s:.1f} tok/s",
                    file=sys.stderr,
                )
    return runs


def table(runs: Runs, names: Sequence[str], levels: Sequence[int]) -> str:
    """Markdown: per level, each path's tok/s, its ratio to ``names[0]``, and TTFT p50."""
    base = names[0]
    head = ["streams"] + [f"{n} tok/s" for n in names]
    head += [f"{n}/{base}" for n in names[1:]] + [f"{n} TTFT p50 ms" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level in levels:
        tps = [runs[(n, level)].median_tokens_per_s() for n in names]
        cells = [str(level)] + [f"{t:.1f}" for t in tps]
        cells += [f"{t / tps[0]:.3f}" for t in tps[1:]]
        cells += [f"{runs[(n, level)].median_ttft_ms():.1f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
