"""How the gateway serves a model of ``models.yaml``: started on request, its output limits.

Sections of a model spec (hpc.spec.ModelSpec) that only the gateway reads.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hpc.specbase import Strict as _Strict


class OnDemand(_Strict):
    """Start the model's job when a request asks for it; stop it when nobody has for a while.

    The gateway submits the job through its backend on the first request that finds no
    ready endpoint, holds that request (and every other one for the model) until the job
    is ready or ``start_deadline_s`` has passed, and cancels the job after ``idle_ttl_s``
    without requests. Under load (more than ``target_in_flight`` requests per ready
    replica) it starts one more job at a time, up to ``max_replicas``, and cancels the
    extra ones again when each has had no request for ``idle_ttl_s`` (see
    docs/on-demand.md).
    """

    idle_ttl_s: float = Field(
        default=900, gt=0, description="cancel the job after this long with no requests"
    )
    max_replicas: int = Field(
        default=1, ge=1, le=64, description="jobs for this model the gateway may run at once"
    )
    target_in_flight: int = Field(
        default=4,
        ge=1,
        le=100_000,
        description="requests in flight per ready replica beyond which the gateway starts one "
        "more job (up to max_replicas)",
    )
    start_deadline_s: float = Field(
        default=900,
        gt=0,
        description="how long a non-streaming request waits for a cold start before a 503",
    )


class TokenLimits(_Strict):
    """What the gateway does with a request's output limit for this model.

    ``max_tokens`` (or ``max_completion_tokens``, or ``max_output_tokens`` on
    ``/v1/responses``) is set to ``max_tokens_default`` when a request sends none, and
    lowered to ``max_tokens_cap`` when it asks for more (clamped, not refused: UIs and agents
    cannot be told to ask for less). A request with neither and no default gets the cap.
    """

    max_tokens_default: int | None = Field(
        default=None,
        gt=0,
        description="the output limit of a request that sends none (UIs often send none)",
    )
    max_tokens_cap: int | None = Field(
        default=None,
        gt=0,
        description="a request asking for more output tokens is lowered to this (clamped)",
    )

    @model_validator(mode="after")
    def _default_within_cap(self) -> TokenLimits:
        default, cap = self.max_tokens_default, self.max_tokens_cap
        if default is not None and cap is not None and default > cap:
            raise ValueError(f"max_tokens_default ({default}) is above max_tokens_cap ({cap})")
        return self

    def any(self) -> bool:
        """True if a default or a cap is set."""
        return self.max_tokens_default is not None or self.max_tokens_cap is not None
