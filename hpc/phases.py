"""A job's start-up phases: where the time went between submission and its first answer."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Phases(BaseModel):
    """Where a job's start-up time went, as the job wrapper measured it on the node.

    Each field is None until its phase is over (or if it did not apply): a job that does not
    stage its weights has no staging fields.
    """

    model_config = ConfigDict(extra="forbid")

    queued_s: float | None = Field(
        default=None, ge=0, description="from the submission's record to the job's start"
    )
    staging_s: float | None = Field(
        default=None, ge=0, description="copying (or finding) the weights in the node's cache"
    )
    staging_bytes: int | None = Field(default=None, ge=0, description="bytes copied (0: reused)")
    staging_mb_s: float | None = Field(
        default=None, ge=0, description="copy rate, MB (10^6 bytes) per second"
    )
    staged_path: str | None = Field(default=None, description="what the engine was given")
    staging_note: str | None = Field(
        default=None, description="why the weights were read from their source instead"
    )
    engine_start_to_healthy_s: float | None = Field(
        default=None, ge=0, description="from the engine's start to its first good health probe"
    )
    first_token_s: float | None = Field(
        default=None,
        ge=0,
        description="the job's first answer: its first generating request's arrival at the "
        "job's front to the first bytes of the engine's 200 (hpc.job.front)",
    )

    def durations(self) -> dict[str, float]:
        """The phases that have a duration, by name (for metrics and tables)."""
        found = {
            "queued": self.queued_s,
            "staging": self.staging_s,
            "engine_start_to_healthy": self.engine_start_to_healthy_s,
            "first_token": self.first_token_s,
        }
        return {name: value for name, value in found.items() if value is not None}
