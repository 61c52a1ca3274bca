"""The swap pool's Prometheus metrics (``GET /metrics``, behind the job's key): which model
each slot holds, how often each model was loaded and how long the last load took, and the
requests in flight. Pure: a function of the pool's slots (hpc.job.slots).
"""

from __future__ import annotations

from hpc.job.slots import Slots


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _family(name: str, kind: str, help_: str, samples: list[tuple[str, object]]) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
    return lines + [f"{name}{labels} {value}" for labels, value in samples]


def render(slots: Slots) -> str:
    """Prometheus' text format (0.0.4) for the pool around ``slots``."""
    loaded = {s.model for s in slots.slots if s.model and s.state == "ready"}
    lines = _family(
        "mt_pool_model_loads_total",
        "counter",
        "Loads of each catalogue model since the pool started.",
        [(f"{{model={_label(m)}}}", slots.model_loads[m]) for m in slots.specs],
    )
    lines += _family(
        "mt_pool_model_loaded",
        "gauge",
        "1 while the model is loaded and ready in a slot.",
        [(f"{{model={_label(m)}}}", int(m in loaded)) for m in slots.specs],
    )
    lines += _family(
        "mt_pool_slot_last_load_seconds",
        "gauge",
        "How long the slot's last load took.",
        [
            (f"{{slot={_label(s.index)},model={_label(s.model or '')}}}", round(s.last_load_s, 3))
            for s in slots.slots
            if s.last_load_s is not None
        ],
    )
    lines += _family(
        "mt_pool_requests_in_flight",
        "gauge",
        "Requests in the pool's engines or waiting for a model's load.",
        [("", slots.in_flight())],
    )
    return "\n".join(lines) + "\n"
