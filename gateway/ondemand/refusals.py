"""Why a request for an on-demand model gets no answer: the refusals, as values.

Each is an ``ErrorReply`` (status, OpenAI error, ``Retry-After``); ``wait`` turns it into
a response, or into an in-band error event on a stream its keep-alives already opened.
"""

from __future__ import annotations

from gateway.inflight import SHUTTING_DOWN
from gateway.ondemand.jobs import ModelState
from hpc.openai import INVALID_REQUEST, SERVER_ERROR, ErrorReply
from hpc.specserving import OnDemand


def failed(state: ModelState, now: float) -> ErrorReply:
    """The model's start failed lately; retry once its back-off (loop time) is over."""
    retry_after = max(1, round(state.failure_until - now))
    return ErrorReply(
        503,
        f"model {state.name!r} could not be started on demand: {state.failure}",
        SERVER_ERROR,
        "on_demand_start_failed",
        param="model",
        retry_after=str(retry_after),
    )


def not_ready(state: ModelState, on_demand: OnDemand, retry_after_s: int) -> ErrorReply:
    """The model's job did not become ready within the model's start deadline."""
    jobs = ", ".join(job.key for job in state.live()) or "being submitted"
    return ErrorReply(
        503,
        f"model {state.name!r} is starting on demand (job {jobs}: {state.phase()}) and was "
        f"not ready within its start_deadline_s of {on_demand.start_deadline_s:g} s; "
        "retry later (the job keeps starting)",
        SERVER_ERROR,
        "on_demand_starting",
        param="model",
        retry_after=str(retry_after_s),
    )


def gateway_at_capacity(model: str, running: int, cap: int, retry_after_s: int) -> ErrorReply:
    """The gateway already runs as many on-demand jobs as it may."""
    return ErrorReply(
        503,
        f"model {model!r} is not running, and the gateway already runs {running} "
        f"on-demand jobs, its limit (max_on_demand_jobs {cap}); retry when one has "
        "gone idle",
        SERVER_ERROR,
        "on_demand_at_capacity",
        param="model",
        retry_after=str(retry_after_s),
    )


def key_at_limit(model: str, client: str, mine: int, limit: int, retry_after_s: int) -> ErrorReply:
    """The request's key has already started as many on-demand jobs as it may."""
    return ErrorReply(
        429,
        f"model {model!r} is not running, and key {client!r} has already started "
        f"{mine} on-demand jobs, its limit (max_on_demand_jobs {limit}); retry when one has "
        "gone idle",
        INVALID_REQUEST,
        "on_demand_key_limit",
        param="model",
        retry_after=str(retry_after_s),
    )


def not_on_demand(model: str, retry_after_s: int) -> ErrorReply:
    """A model with no ready endpoint that models.yaml no longer starts on demand."""
    return ErrorReply(
        503,
        f"model {model!r} has no ready endpoint and is no longer on demand in models.yaml "
        f"(hint: mt submit {model})",
        SERVER_ERROR,
        "no_ready_endpoint",
        param="model",
        retry_after=str(retry_after_s),
    )


def shutting_down(retry_after_s: int) -> ErrorReply:
    """The gateway stops, and the model's job was not ready within its shutdown grace."""
    return ErrorReply(
        503,
        SHUTTING_DOWN,
        SERVER_ERROR,
        "gateway_shutting_down",
        retry_after=str(retry_after_s),
    )
