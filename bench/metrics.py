"""Summaries of a level's request records: throughput, TTFT / ITL / end-to-end percentiles.

Definitions (the ones vLLM's and llama.cpp's benchmark scripts use):

- TTFT: first text chunk (or the whole answer, without streaming) minus send time.
- ITL: the gaps between consecutive text chunks of one request, pooled over all requests.
- end-to-end: end minus send time.
- requests/s and output tokens/s: over the level's wall time, from its first send to its
  last end; only successful requests count.

Percentiles interpolate linearly between closest ranks (numpy's default), so p50 of
``[1, 2, 3, 4]`` is 2.5.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from bench.records import RequestRecord

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation; None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    if not values:
        return None
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ttft_s(record: RequestRecord) -> float | None:
    """Time to first token, or None if no token came."""
    if record.first_token_s is None:
        return None
    return record.first_token_s - record.sent_s


def itl_s(record: RequestRecord) -> list[float]:
    """The inter-token latencies of one streamed request: gaps between its text chunks."""
    chunks = record.chunk_s
    return [later - earlier for earlier, later in itertools.pairwise(chunks)]


def e2e_s(record: RequestRecord) -> float | None:
    """End-to-end latency, or None if the request never ended."""
    return None if record.end_s is None else record.end_s - record.sent_s


def output_tokens(record: RequestRecord) -> int:
    """Tokens out: the engine's usage when it gave one, else the streamed text chunks."""
    if record.output_tokens is not None:
        return record.output_tokens
    return len(record.chunk_s)


@dataclass(frozen=True)
class Percentiles:
    """p50 / p90 / p99 in milliseconds (None when there were no samples)."""

    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        """Percentiles of samples given in seconds, reported in milliseconds."""
        ms = [s * 1000 for s in seconds]
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(p50, p90, p99)


@dataclass(frozen=True)
class LevelSummary:
    """One concurrency level (for one model): what a row of ``results.csv`` holds."""

    model: str
    concurrency: int
    requests: int
    errors: int
    error_rate: float
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    chunks_per_s: float
    mean_output_tokens: float
    ttft_ms: Percentiles
    itl_ms: Percentiles
    e2e_ms: Percentiles

    def flat(self) -> dict[str, object]:
        """One flat row: ``ttft_ms_p50`` and so on."""
        row: dict[str, object] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                row.update({f"{key}_{name}": v for name, v in value.items()})
            else:
                row[key] = value
        return row


def summarize(records: Sequence[RequestRecord], *, model: str, concurrency: int) -> LevelSummary:
    """The summary of one level's records (all of them: pass one model's records for A/B)."""
    ok = [r for r in records if r.ok]
    errors = len(records) - len(ok)
    ends = [r.end_s for r in records if r.end_s is not None]
    starts = [r.sent_s for r in records]
    duration = (max(ends) - min(starts)) if ends and starts else 0.0
    tokens = sum(output_tokens(r) for r in ok)
    chunks = sum(len(r.chunk_s) for r in ok)

    def rate(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    return LevelSummary(
        model=model,
        concurrency=concurrency,
        requests=len(records),
        errors=errors,
        error_rate=errors / len(records) if records else 0.0,
        duration_s=duration,
        requests_per_s=rate(len(ok)),
        output_tokens_per_s=rate(tokens),
        chunks_per_s=rate(chunks),
        mean_output_tokens=tokens / len(ok) if ok else 0.0,
        ttft_ms=Percentiles.of([t for r in ok if (t := ttft_s(r)) is not None]),
        itl_ms=Percentiles.of([gap for r in ok for gap in itl_s(r)]),
        e2e_ms=Percentiles.of([t for r in ok if (t := e2e_s(r)) is not None]),
    )
