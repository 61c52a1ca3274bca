"""Real sweeps against the fake engine: files written, numbers plausible, failures counted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from fake_upstream import FakeUpstream, Knobs

from bench.loadgen import Progress, Target, sweep
from bench.plots import write_plots
from bench.report import summaries, write_results
from bench.workload import Schedule, Workload

pytestmark = pytest.mark.timeout(60)


async def test_a_sweep_writes_results_with_plausible_numbers(tmp_path: Path) -> None:
    seen: list[Progress] = []
    async with FakeUpstream(Knobs(tokens=8, tokens_per_s=400, ttft_s=0.01)) as fake:
        workload = Workload(models=("fake-model",), prompt_tokens=16, max_tokens=8, seed=3)
        levels = await sweep(
            Target(fake.base_url), workload, Schedule(concurrency=(1, 4), requests=8), seen.append
        )
    rows = summaries(levels)
    assert [(s.concurrency, s.requests, s.errors) for s in rows] == [(1, 8, 0), (4, 8, 0)]
    for s in rows:
        assert s.output_tokens_per_s > 0
        assert s.mean_output_tokens == 8  # from the usage chunk
        assert s.ttft_ms.p50 is not None and s.e2e_ms.p50 is not None
        assert 0 < s.ttft_ms.p50 < s.e2e_ms.p50
        assert s.itl_ms.p50 is not None and s.itl_ms.p50 > 0
    assert seen and seen[-1].done == 8
    record = levels[0].records[0]
    assert record.prompt_tokens is not None and record.prompt_tokens >= 16
    assert len(record.chunk_s) == 8

    written = write_results(tmp_path, {"workload": "test"}, levels)
    written += write_plots(tmp_path, rows)
    assert sorted(p.name for p in written) == [
        "latency.png",
        "results.csv",
        "results.json",
        "throughput.png",
    ]
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["concurrency"] for row in table] == ["1", "4"]
    assert float(table[0]["output_tokens_per_s"]) > 0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["config"] == {"workload": "test"}
    assert document["environment"]["cpu_count"]
    assert len(document["levels"][1]["records"]) == 8
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")


async def test_the_same_seed_sends_the_same_requests() -> None:
    bodies = []
    for _ in range(2):
        async with FakeUpstream(Knobs(tokens=2)) as fake:
            workload = Workload(models=("fake-model",), prompt_tokens=20, max_tokens=2, seed=9)
            await sweep(Target(fake.base_url), workload, Schedule(concurrency=(1,), requests=3))
            bodies.append(sorted(fake.seen.bodies))
    assert bodies[0] == bodies[1]


@pytest.mark.parametrize(
    ("knobs", "error"),
    [
        (Knobs(tokens=6, cut_after=2), "ClientPayloadError"),  # the engine dies mid-stream
        (Knobs(status=500), "HTTP 500"),
        (Knobs(tokens=3, omit_done=True), "without data: [DONE]"),
    ],
)
async def test_engine_failures_are_counted_as_errors(knobs: Knobs, error: str) -> None:
    async with FakeUpstream(knobs) as fake:
        workload = Workload(models=("fake-model",), max_tokens=6)
        (level,) = await sweep(Target(fake.base_url), workload, Schedule((2,), requests=4))
    (summary,) = level.summaries
    assert summary.errors == 4
    assert summary.error_rate == 1.0
    assert summary.output_tokens_per_s == 0
    assert all(error in (r.error or "") for r in level.records), level.records[0].error


async def test_non_streaming_requests_count_ttft_as_the_whole_answer() -> None:
    async with FakeUpstream(Knobs(tokens=5)) as fake:
        workload = Workload(models=("fake-model",), stream=False, max_tokens=5)
        (level,) = await sweep(Target(fake.base_url), workload, Schedule((2,), requests=4))
    (summary,) = level.summaries
    assert summary.errors == 0
    assert summary.mean_output_tokens == 5
    assert summary.itl_ms.p50 is None


async def test_ab_comparison_interleaves_models(tmp_path: Path) -> None:
    async with FakeUpstream(Knobs(tokens=3)) as fake:
        # The fake answers any model name: enough to see the interleaving and the split.
        workload = Workload(models=("a", "b"), max_tokens=3)
        (level,) = await sweep(Target(fake.base_url), workload, Schedule((2,), requests=6))
        sent = [json.loads(body)["model"] for body in fake.seen.bodies]
    assert sorted(sent) == ["a", "a", "a", "b", "b", "b"]
    assert [r.model for r in level.records] == ["a", "b", "a", "b", "a", "b"]
    assert [(s.model, s.requests) for s in level.summaries] == [("a", 3), ("b", 3)]
