"""What one benchmark request did: the per-request record every summary is computed from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """One request, its times in seconds since the start of its level (``time.perf_counter``).

    ``chunk_s`` holds the arrival time of every streamed chunk that carried text; a
    non-streaming request has none and its first token counts as arriving with the answer.
    """

    concurrency: int
    model: str
    index: int
    sent_s: float
    first_token_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 200 and ended cleanly."""
        return self.error is None and self.status == 200 and self.end_s is not None
