"""``GET /metrics``: counters kept in memory, rendered in Prometheus' text format on demand.

Recording is a dict update or a ``bisect`` per request, no I/O and no locks (one event
loop). Label values are bounded: the model label is a name the gateway routes (anything
else is counted as ``-``), so clients cannot grow the series without limit.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping

from gateway.connections import Connections
from hpc.registry import Record

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a cache hit on a local engine to a long prefill on a busy one.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Seconds between two chunks of a stream: a fast engine's token gap up to a stall.
GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Seconds of the gateway's own work per request: a fraction of a millisecond when all is well.
OVERHEAD_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# Seconds before a request goes upstream: the gateway's work, plus replicas that failed first.
QUEUE_BUCKETS_S = (*OVERHEAD_BUCKETS_S[:-1], 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """Cumulative-bucket histogram per label value."""

    __slots__ = ("_counts", "_sums", "buckets")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.buckets = buckets
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        """Count one observation of ``value`` for ``label``."""
        counts = self._counts.get(label)
        if counts is None:
            counts = self._counts[label] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sums[label] += value

    def merge(self, label: str, counts: list[int], total: float) -> None:
        """Add observations counted elsewhere (``Gaps``): one dict update per stream, not
        per chunk."""
        mine = self._counts.get(label)
        if mine is None:
            mine = self._counts[label] = [0] * (len(self.buckets) + 1)
        for index, count in enumerate(counts):
            mine[index] += count
        self._sums[label] += total

    def render(self, name: str, label_name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` lines."""
        lines = []
        for label, counts in sorted(self._counts.items()):
            running = 0
            for bound, count in zip((*self.buckets, "+Inf"), counts, strict=True):
                running += count
                lines.append(f'{name}_bucket{{{label_name}="{label}",le="{bound}"}} {running}')
            lines.append(f'{name}_sum{{{label_name}="{label}"}} {self._sums[label]:.6f}')
            lines.append(f'{name}_count{{{label_name}="{label}"}} {running}')
        return lines


class Gaps:
    """One stream's gaps between chunks, counted into buckets locally and merged into
    ``Metrics.inter_token_latency`` when the stream ends (the per-chunk cost is a bisect)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(GAP_BUCKETS_S) + 1)
        self.total = 0.0

    def add(self, gap_s: float) -> None:
        """Count one gap."""
        self.counts[bisect.bisect_left(GAP_BUCKETS_S, gap_s)] += 1
        self.total += gap_s


class Metrics:
    """The gateway's counters; one per app."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)
        self.in_flight = 0
        self.upstream_latency = Histogram()
        self.duration = Histogram()
        self.upstream_failures: dict[str, int] = defaultdict(int)
        # (model asked for, model that answered instead), for models.yaml fallbacks.
        self.fallbacks: dict[tuple[str, str], int] = defaultdict(int)
        # Per request, by the model that answered; see ``render`` for what each measures.
        self.time_to_first_token = Histogram()
        self.inter_token_latency = Histogram(GAP_BUCKETS_S)
        self.queue = Histogram(QUEUE_BUCKETS_S)
        self.overhead = Histogram(OVERHEAD_BUCKETS_S)
        # Tokens charged by estimate (a stream cut or abandoned before its usage event).
        self.estimated_tokens: dict[tuple[str, str], int] = defaultdict(int)

    def finished(self, model: str, status: int, duration_s: float) -> None:
        """Count one request, whatever its path, by model and status."""
        self.requests[(model, status)] += 1
        self.duration.observe(model, duration_s)

    def count_tokens(self, model: str, prompt: int | None, completion: int | None) -> None:
        """Add the tokens an upstream reported for one request."""
        if prompt:
            self.tokens[(model, "prompt")] += prompt
        if completion:
            self.tokens[(model, "completion")] += completion

    def render(self, replicas: dict[str, tuple[int, bool]] | None = None) -> str:
        """Everything, in Prometheus' text exposition format.

        ``replicas`` maps an upstream's source to (outstanding requests, healthy).
        """
        out = [
            "# HELP mt_gateway_requests_total Requests answered, by model and HTTP status.",
            "# TYPE mt_gateway_requests_total counter",
        ]
        for (model, status), count in sorted(self.requests.items()):
            out.append(f'mt_gateway_requests_total{{model="{model}",status="{status}"}} {count}')
        out += [
            "# HELP mt_gateway_in_flight Requests being answered now.",
            "# TYPE mt_gateway_in_flight gauge",
            f"mt_gateway_in_flight {self.in_flight}",
            "# HELP mt_gateway_tokens_total Tokens reported by upstreams, by model and kind.",
            "# TYPE mt_gateway_tokens_total counter",
        ]
        for (model, kind), count in sorted(self.tokens.items()):
            out.append(f'mt_gateway_tokens_total{{model="{model}",kind="{kind}"}} {count}')
        out += [
            "# HELP mt_gateway_upstream_latency_seconds Time until the upstream's response "
            "headers.",
            "# TYPE mt_gateway_upstream_latency_seconds histogram",
            *self.upstream_latency.render("mt_gateway_upstream_latency_seconds", "model"),
            "# HELP mt_gateway_request_duration_seconds Whole request, as the client saw it.",
            "# TYPE mt_gateway_request_duration_seconds histogram",
            *self.duration.render("mt_gateway_request_duration_seconds", "model"),
            "# HELP mt_gateway_time_to_first_token_seconds From the request received to the "
            "first byte of the answer relayed to the client.",
            "# TYPE mt_gateway_time_to_first_token_seconds histogram",
            *self.time_to_first_token.render("mt_gateway_time_to_first_token_seconds", "model"),
            "# HELP mt_gateway_inter_token_latency_seconds Gaps between the chunks of a stream "
            "relayed to the client (counted when the stream ends).",
            "# TYPE mt_gateway_inter_token_latency_seconds histogram",
            *self.inter_token_latency.render("mt_gateway_inter_token_latency_seconds", "model"),
            "# HELP mt_gateway_queue_seconds From the request received to its sending to the "
            "replica that answered (admission, routing, failed replicas).",
            "# TYPE mt_gateway_queue_seconds histogram",
            *self.queue.render("mt_gateway_queue_seconds", "model"),
            "# HELP mt_gateway_overhead_seconds The gateway's own time: received to sent "
            "upstream, plus the upstream's first byte to the client's.",
            "# TYPE mt_gateway_overhead_seconds histogram",
            *self.overhead.render("mt_gateway_overhead_seconds", "model"),
            "# HELP mt_gateway_upstream_failures_total Replicas passed over before the first byte "
            "(unreachable, 5xx, broken), by replica.",
            "# TYPE mt_gateway_upstream_failures_total counter",
        ]
        for source, count in sorted(self.upstream_failures.items()):
            out.append(f'mt_gateway_upstream_failures_total{{replica="{_escape(source)}"}} {count}')
        out += [
            "# HELP mt_gateway_fallbacks_total Requests a fallback model answered, by the "
            "model asked for and the one that answered.",
            "# TYPE mt_gateway_fallbacks_total counter",
        ]
        for (model, served), count in sorted(self.fallbacks.items()):
            out.append(
                f'mt_gateway_fallbacks_total{{model="{model}",served_model="{served}"}} {count}'
            )
        out += [
            "# HELP mt_gateway_estimated_tokens_total Tokens charged by estimate: streams cut "
            "or abandoned before the upstream's usage, and usage the gateway counted for an "
            "engine that sends none (also in mt_gateway_tokens_total).",
            "# TYPE mt_gateway_estimated_tokens_total counter",
        ]
        for (model, kind), count in sorted(self.estimated_tokens.items()):
            out.append(
                f'mt_gateway_estimated_tokens_total{{model="{model}",kind="{kind}"}} {count}'
            )
        if replicas is not None:
            out += [
                "# HELP mt_gateway_replica_outstanding Requests in flight per replica.",
                "# TYPE mt_gateway_replica_outstanding gauge",
            ]
            for source, (outstanding, _) in sorted(replicas.items()):
                out.append(
                    f'mt_gateway_replica_outstanding{{replica="{_escape(source)}"}} {outstanding}'
                )
            out += [
                "# HELP mt_gateway_replica_healthy 1 if the balancer would send it requests now "
                "(not ejected by failed health probes, not skipped for connection failures).",
                "# TYPE mt_gateway_replica_healthy gauge",
            ]
            for source, (_, healthy) in sorted(replicas.items()):
                out.append(
                    f'mt_gateway_replica_healthy{{replica="{_escape(source)}"}} {int(healthy)}'
                )
        return "\n".join(out) + "\n"


def render_probes(probes: Mapping[str, tuple[bool, tuple[int, int] | None]]) -> str:
    """The background prober's view, per job replica: last probe good, engine's own load.

    ``probes`` maps a replica to (last probe good, (running, waiting) if the engine reports
    them); a replica whose engine exposes no load has no ``engine_requests`` series.
    """
    out = [
        "# HELP mt_gateway_replica_probe_ok 1 if the last health probe of a job replica passed.",
        "# TYPE mt_gateway_replica_probe_ok gauge",
    ]
    for source, (ok, _) in sorted(probes.items()):
        out.append(f'mt_gateway_replica_probe_ok{{replica="{_escape(source)}"}} {int(ok)}')
    out += [
        "# HELP mt_gateway_replica_engine_requests Requests the engine itself reports (all "
        "its clients), by kind: running or waiting.",
        "# TYPE mt_gateway_replica_engine_requests gauge",
    ]
    for source, (_, load) in sorted(probes.items()):
        if load is None:
            continue
        for kind, value in zip(("running", "waiting"), load, strict=True):
            out.append(
                f'mt_gateway_replica_engine_requests{{replica="{_escape(source)}",kind="{kind}"}}'
                f" {value}"
            )
    return "\n".join(out) + "\n"


def render_phases(records: Iterable[Record]) -> str:
    """Each serving job's start-up phases (its record's, hpc.registry.Phases), as gauges.

    One series per job and phase (label ``job``: the record key), so a dashboard can show
    what a model's replicas spent queued, staging, loading; the series go when the job does.
    """
    out = [
        "# HELP mt_job_startup_phase_seconds Start-up phases of each serving job, by model, "
        "job and phase (queued, staging, engine_start_to_healthy, first_token).",
        "# TYPE mt_job_startup_phase_seconds gauge",
    ]
    staged = []
    for record in sorted(records, key=lambda r: r.key):
        if record.phases is None:
            continue
        labels = f'model="{_escape(record.model)}",job="{_escape(record.key)}"'
        for phase, seconds in record.phases.durations().items():
            out.append(f'mt_job_startup_phase_seconds{{{labels},phase="{phase}"}} {seconds:g}')
        if record.phases.staging_bytes is not None:
            staged.append((labels, record.phases.staging_bytes))
    out += [
        "# HELP mt_job_staging_bytes Bytes each serving job copied into its node's weight "
        "cache at start-up (0: the node had them already).",
        "# TYPE mt_job_staging_bytes gauge",
    ]
    out += [f"mt_job_staging_bytes{{{labels}}} {copied}" for labels, copied in staged]
    return "\n".join(out) + "\n"


def render_connections(connections: Connections) -> str:
    """Client connections open now, and those refused at a cap, by cap."""
    out = [
        "# HELP mt_gateway_connections_open Client connections open now.",
        "# TYPE mt_gateway_connections_open gauge",
        f"mt_gateway_connections_open {connections.total}",
        "# HELP mt_gateway_connections_refused_total Client connections refused with 503 at a "
        "cap, by cap: total (--max-connections) or client (--max-connections-per-client).",
        "# TYPE mt_gateway_connections_refused_total counter",
    ]
    for cap, count in sorted(connections.refused.items()):
        out.append(f'mt_gateway_connections_refused_total{{limit="{cap}"}} {count}')
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
