"""Metrics math against hand-computed cases: percentiles, TTFT, ITL, tokens/s."""

from __future__ import annotations

import pytest

from bench.metrics import e2e_s, itl_s, output_tokens, percentile, summarize, ttft_s
from bench.records import RequestRecord
from bench.workload import prompt


def _record(
    sent: float, chunks: list[float], end: float, tokens: int | None = None
) -> RequestRecord:
    return RequestRecord(
        concurrency=2,
        model="m",
        index=0,
        sent_s=sent,
        first_token_s=chunks[0] if chunks else None,
        chunk_s=chunks,
        end_s=end,
        output_tokens=tokens,
        status=200,
    )


def test_percentiles_interpolate_between_closest_ranks() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    # rank 0.9 * 9 = 8.1 → 9 + 0.1 * (10 - 9)
    assert percentile(list(range(1, 11)), 90) == pytest.approx(9.1)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="outside"):
        percentile([1], 101)


def test_ttft_itl_and_e2e_of_one_streamed_request() -> None:
    record = _record(1.0, [1.25, 1.5, 2.0], 2.5)
    assert ttft_s(record) == 0.25
    assert itl_s(record) == [0.25, 0.5]
    assert e2e_s(record) == 1.5
    assert output_tokens(record) == 3  # no usage: one token per chunk
    assert output_tokens(_record(1.0, [1.25], 2.0, tokens=7)) == 7


def test_a_level_summary_by_hand() -> None:
    a = _record(0.0, [0.1, 0.2, 0.4], 0.5, tokens=10)  # ttft 100, itl 100 200, e2e 500
    b = _record(0.5, [0.8, 0.9], 1.0, tokens=6)  # ttft 300, itl 100, e2e 500
    failed = RequestRecord(2, "m", 2, sent_s=0.2, end_s=0.3, status=500, error="HTTP 500")
    summary = summarize([a, b, failed], model="m", concurrency=2)
    assert summary.requests == 3
    assert summary.errors == 1
    assert summary.error_rate == pytest.approx(1 / 3)
    assert summary.duration_s == 1.0  # first send 0.0 to last end 1.0
    assert summary.requests_per_s == 2.0
    assert summary.output_tokens_per_s == 16.0
    assert summary.chunks_per_s == 5.0
    assert summary.mean_output_tokens == 8.0
    assert summary.ttft_ms.p50 == pytest.approx(200)  # of 100 and 300
    assert summary.ttft_ms.p99 == pytest.approx(298)
    assert summary.itl_ms.p50 == pytest.approx(100)  # of 100, 100, 200
    assert summary.itl_ms.p90 == pytest.approx(180)
    assert summary.e2e_ms.p50 == pytest.approx(500)
    row = summary.flat()
    assert row["ttft_ms_p50"] == summary.ttft_ms.p50
    assert "ttft_ms" not in row


def test_an_empty_level_has_no_percentiles_and_no_rates() -> None:
    summary = summarize([], model="m", concurrency=1)
    assert summary.requests == 0
    assert summary.requests_per_s == 0.0
    assert summary.ttft_ms.p50 is None


def test_prompts_are_seeded_and_reproducible() -> None:
    assert prompt(1, 3, 50) == prompt(1, 3, 50)
    assert prompt(1, 3, 50) != prompt(2, 3, 50)
    assert prompt(1, 3, 50) != prompt(1, 4, 50)
    assert len(prompt(0, 0, 50).split()) == 50
