"""How busy an engine says it is: requests running and waiting, from its own endpoints.

Read by the gateway's health prober, through the job's front, to balance replicas. (The
job wrapper's drain counts what its front forwards instead: hpc.job.front.)

- vLLM: ``GET /metrics`` (always on), Prometheus text with ``vllm:num_requests_running``
  and ``vllm:num_requests_waiting``, one series per model and engine index (summed here).
- llama.cpp's ``llama-server``: ``GET /metrics`` with ``llamacpp:requests_processing`` and
  ``llamacpp:requests_deferred`` (only when started with ``--metrics``), else ``GET /slots``
  (on by default): a list of slots, busy ones ``is_processing`` (or ``state`` 1 in older
  builds).
- llama-cpp-python's server (``python -m llama_cpp.server``) has neither: both answer 404.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

RUNNING_SERIES = ("vllm:num_requests_running", "llamacpp:requests_processing")
WAITING_SERIES = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
# "This engine has no such endpoint" (501: llama-server with the endpoint switched off).
ABSENT_STATUSES = frozenset({404, 405, 501})


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Requests an engine reports: generating now, and queued behind them."""

    running: int
    waiting: int

    @property
    def in_flight(self) -> int:
        """Every request the engine has accepted and not yet answered whole."""
        return self.running + self.waiting


def load_paths(engine: str) -> tuple[str, ...]:
    """Where to ask ``engine`` (``vllm`` or ``llamacpp``) for its load, best first."""
    return ("/metrics", "/slots") if engine == "llamacpp" else ("/metrics",)


def parse_engine_load(text: str) -> EngineLoad | None:
    """Running and waiting requests from a Prometheus text scrape; None if it has neither.

    Series with several label sets (vLLM labels by model and engine) are summed.
    """
    running = waiting = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(("vllm:", "llamacpp:")):
            continue
        value = _sample(line, RUNNING_SERIES)
        if value is not None:
            running += value
            found = True
            continue
        value = _sample(line, WAITING_SERIES)
        if value is not None:
            waiting += value
            found = True
    return EngineLoad(int(running), int(waiting)) if found else None


def _sample(line: str, names: Iterable[str]) -> float | None:
    for name in names:
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            rest = line[len(name) :]
            if rest.startswith("{"):
                rest = rest[rest.rfind("}") + 1 :]
            parts = rest.split()
            try:
                return float(parts[0]) if parts else None
            except ValueError:
                return None
    return None


def parse_slots(data: object) -> EngineLoad | None:
    """llama-server's ``/slots``: a list of slots, busy ones ``is_processing`` (or state 1)."""
    if not isinstance(data, list):
        return None
    busy = 0
    for slot in data:
        if not isinstance(slot, dict):
            return None
        if slot.get("is_processing") is True or slot.get("state") == 1:
            busy += 1
    return EngineLoad(running=busy, waiting=0)
