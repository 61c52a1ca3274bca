"""`mt bench` end to end: the CLI against a URL (the session's bare llama-server,
tests/realengine.py), the overhead run, Gemma through the gateway."""

from __future__ import annotations

import csv
import json
import time
import urllib.request
from pathlib import Path

import pytest
from mtcli import GEMMA, gemma_models_yaml, mt, owner_headers
from realengine import BareEngine

from bench.overhead import OverheadConfig, markdown, run_overhead


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
def test_mt_bench_against_a_url_writes_csv_json_and_plots(
    bare_engine: BareEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("ENGINE_KEY", bare_engine.key)
    done = mt(
        "bench", bare_engine.base_url, "--api-key-env", "ENGINE_KEY", "--concurrency", "1,2",
        "--requests", "4", "--max-tokens", "8", "--prompt-tokens", "12", "--seed", "5", "--plot",
        "--out", str(out),
    )  # fmt: skip
    assert "E2E" in done.stdout  # the table
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["model"] for r in rows} == {GEMMA}  # the model came from /v1/models
    assert [(r["concurrency"], r["errors"]) for r in rows] == [("1", "0"), ("2", "0")]
    assert all(float(r["output_tokens_per_s"]) > 0 for r in rows)
    assert all(float(r["ttft_ms_p50"]) < float(r["e2e_ms_p50"]) for r in rows)
    document = json.loads((out / "results.json").read_text())
    assert document["config"]["workload"]["seed"] == 5
    assert (out / "latency.png").exists() and (out / "throughput.png").exists()


def test_mt_bench_rejects_bad_levels_and_missing_key_env(tmp_path: Path) -> None:
    bad = mt("bench", "http://127.0.0.1:9/v1", "--concurrency", "0,x", check=False)
    assert bad.returncode == 2
    backend = mt("bench", "http://127.0.0.1:9/v1", "--backend", "k8s", check=False)
    assert backend.returncode == 2 and "local, slurm" in backend.stderr
    unset = mt("bench", "http://127.0.0.1:9/v1", "--api-key-env", "NOPE_KEY", check=False)
    assert unset.returncode == 1
    assert "NOPE_KEY" in unset.stderr and "hint:" in unset.stderr


@pytest.mark.timeout(120)
def test_overhead_measures_direct_bare_and_the_gateway_then_its_rss(tmp_path: Path) -> None:
    config = OverheadConfig(
        concurrency=(1, 4), requests=8, max_tokens=8, paths=("direct", "bare", "mt"), rss_after=50
    )
    result = run_overhead(config, workdir=tmp_path)
    assert [(r.path, r.concurrency) for r in result.rows] == [
        ("direct", 1), ("bare", 1), ("mt", 1), ("direct", 4), ("bare", 4), ("mt", 4),
    ]  # fmt: skip
    for row in result.rows:
        assert row.summary.errors == 0, row.first_error
        assert row.summary.chunks_per_s > 0
    gateway = result.row("mt", 4)
    assert gateway is not None and gateway.proxy_peak_rss_mib and gateway.proxy_peak_rss_mib > 1
    # Measured (CPU time comes in 10 ms clock ticks: 8 tiny requests may use less than one).
    assert gateway.proxy_cpu_s is not None and gateway.proxy_cpu_s >= 0
    # The gateway ran as a user runs it: auth on, a key with a model list and rate limits.
    keys = (tmp_path / "keys.yaml").read_text()
    assert "requests_per_min" in keys and "tokens_per_min" in keys and "fake-*" in keys
    assert result.rss is not None
    assert (result.rss.requests, result.rss.errors) == (50, 0)
    assert 1 < result.rss.fresh_mib <= result.rss.peak_mib
    table = markdown(result)
    assert "| 4 | mt |" in table and "| 4 | bare |" in table
    assert "RSS around 50 more" in table


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
def test_mt_bench_against_gemma_through_the_gateway(
    gemma_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mtcli import running_gateway

    monkeypatch.setenv("MT_MODELS", str(gemma_models_yaml(tmp_path / "models.yaml", gemma_gguf)))
    with running_gateway() as gateway_url:
        record = json.loads(mt("submit", GEMMA, "--wait", "--json").stdout)
        try:
            _wait_listed(gateway_url, GEMMA)
            out = tmp_path / "out"
            mt(
                "bench", GEMMA, "--gateway", gateway_url, "--concurrency", "1,2",
                "--requests", "2", "--max-tokens", "12", "--prompt-tokens", "16",
                "--out", str(out),
            )  # fmt: skip
        finally:
            mt("cancel", record["key"])
    document = json.loads((out / "results.json").read_text())
    for level in document["levels"]:
        (summary,) = level["summaries"]
        assert summary["errors"] == 0, level["records"]
        assert summary["output_tokens_per_s"] > 0
        assert 0 < summary["ttft_ms"]["p50"] < summary["e2e_ms"]["p50"]


def _wait_listed(gateway_url: str, model: str) -> None:
    # The gateway's reload loop picks a ready record up within its interval.
    deadline = time.monotonic() + 15
    while True:
        request = urllib.request.Request(gateway_url + "/v1/models", headers=owner_headers())  # noqa: S310
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            if model in [m["id"] for m in json.loads(response.read())["data"]]:
                return
        assert time.monotonic() < deadline, "the gateway never listed the ready model"
        time.sleep(0.2)
