"""What a benchmark sends: its settings, and seeded, reproducible prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Plain, common English words: most tokenizers give about one token per word, so
# ``prompt_tokens`` words make a prompt of roughly that many tokens.
_TEXT = """
the of and to in is was for on that with as by at from his her they this which had not are
but have one were all can their there been has when who more will would time into about than
only other new some could these two may first then do any like my now over such our man me
even most made after also did many before must through years where much your way well down
should because each just those people how too little state good very make world still own see
men work long get here between both life being under never day same another know while last
might us great old year off come since against go came right used take three water city house
light river music story garden market window
"""
_WORDS = tuple(_TEXT.split())


@dataclass(frozen=True)
class Workload:
    """The requests of a run: one chat request per prompt, the same at every level."""

    models: tuple[str, ...]
    prompt_tokens: int = 128
    max_tokens: int = 64
    stream: bool = True
    seed: int = 0
    temperature: float = 0.0

    def model_for(self, index: int) -> str:
        """Request ``index`` goes to this model: A/B runs alternate, so both see the same load."""
        return self.models[index % len(self.models)]


@dataclass(frozen=True)
class Schedule:
    """How many requests a level sends and how fast: a count or a duration, and a rate."""

    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    requests: int | None = None  # per level; default: 4 x concurrency, at least 16
    duration_s: float | None = None  # per level, instead of a count
    rate_per_s: float | None = None  # Poisson arrivals at this mean rate; None: back to back
    timeout_s: float = 300.0  # one request
    warmup: int = 0  # requests per level whose records are dropped
    extra_headers: dict[str, str] = field(default_factory=dict)

    def requests_for(self, concurrency: int) -> int | None:
        """The request count of a level, or None when it runs for ``duration_s``."""
        if self.duration_s is not None:
            return None
        return self.requests if self.requests is not None else max(16, 4 * concurrency)


def prompt(seed: int, index: int, words: int) -> str:
    """Prompt ``index`` of a run seeded ``seed``: the same text on every machine and run."""
    rng = random.Random(f"{seed}:{index}")  # noqa: S311 - reproducible text, not secrets
    body = " ".join(rng.choice(_WORDS) for _ in range(max(1, words - 7)))
    return f"Continue this text with a long story: {body}"


def arrival_gaps_s(seed: int, rate_per_s: float, count: int) -> list[float]:
    """Seeded exponential gaps between sends: a Poisson process at ``rate_per_s``."""
    rng = random.Random(f"arrivals:{seed}")  # noqa: S311 - reproducible, not secrets
    return [rng.expovariate(rate_per_s) for _ in range(count)]
