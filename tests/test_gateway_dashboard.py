"""The Grafana dashboard under docs/ asks only for metrics a real gateway exports.

A dashboard that names a metric the gateway does not export shows "No data" forever and
nobody notices; so every metric name in its expressions must appear as a sample in a real
``/metrics`` scrape of a gateway that has served requests (streaming and not, one through a
failed replica) to a probed replica that reports its engine load: the session's real
llama-server job (tests/realengine.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from realengine import RealEngine
from test_gateway_health import engine_requests, scrape, wait_for_metrics
from test_gateway_proxy import CHAT, add_record, chat, closed_port_url, gateway

pytestmark = pytest.mark.timeout(30)

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana" / "mt-gateway.json"
_METRIC = re.compile(r"\bmt_gateway_[a-z_]+\b")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def expressions() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]


def test_the_dashboard_is_importable() -> None:
    data = dashboard()
    assert data["uid"] == "mt-gateway"
    assert data["title"]
    assert isinstance(data["schemaVersion"], int)
    assert data["id"] is None  # Grafana assigns it on import
    panels = data["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in data["templating"]["list"]}
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
    for expr in expressions():
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
        assert set(re.findall(r"\$(\w+)", expr)) <= variables | {"__rate_interval"}, expr
    # Latency panels show p50, p95 and p99 from the histograms' buckets.
    quantiles = [e for e in expressions() if e.startswith("histogram_quantile(")]
    for name in ("time_to_first_token", "inter_token_latency", "overhead", "queue"):
        shown = sorted(q.split(",")[0] for q in quantiles if f"mt_gateway_{name}_seconds" in q)
        assert shown == [f"histogram_quantile({q}" for q in ("0.5", "0.95", "0.99")], name


@pytest.mark.llamacpp
@pytest.mark.timeout(300)
async def test_every_metric_in_the_dashboard_is_in_a_real_scrape(
    tmp_path: Path, real_engine: RealEngine
) -> None:
    used = {name for expr in expressions() for name in _METRIC.findall(expr)}
    # The real llama-server job (with --metrics: llamacpp:requests_* give its load).
    key = real_engine.record_in(tmp_path / "registry", "m").key
    # A replica nothing listens on: its connection failures are counted.
    add_record(tmp_path / "registry", "m", closed_port_url())
    async with (
        gateway(tmp_path, health_interval_s=600) as url,
        aiohttp.ClientSession() as client,
    ):
        await wait_for_metrics(client, url, lambda m: engine_requests(key, "waiting") in m)
        for stream in (False, True, False, True):
            ask = {**chat("m", stream=stream), "max_tokens": 2}
            async with client.post(url + CHAT, json=ask) as resp:
                assert resp.status == 200
                await resp.read()
        async with client.get(url + "/metrics") as resp:
            exported = {sample.split("{")[0] for sample in scrape(await resp.text())}
    assert used <= exported, sorted(used - exported)
    assert used >= {
        "mt_gateway_requests_total",
        "mt_gateway_tokens_total",
        "mt_gateway_in_flight",
        "mt_gateway_replica_healthy",
        "mt_gateway_replica_probe_ok",
        "mt_gateway_replica_outstanding",
        "mt_gateway_replica_engine_requests",
        "mt_gateway_upstream_failures_total",
    }
