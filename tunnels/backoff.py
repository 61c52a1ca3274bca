"""Bounded, jittered backoff between reconnect attempts, and which failures end retrying."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hpc.errors import ChangedHostKeyError, MTError, SSHAuthError, UnknownHostKeyError


@dataclass
class Backoff:
    """Delays of ``first_s · 2^n`` capped at ``max_s``, each with ±``jitter`` (full range)."""

    first_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.5
    attempt: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_s(self) -> float:
        """The delay before the next attempt; grows until ``reset()``."""
        base = min(self.max_s, self.first_s * (2**self.attempt))
        self.attempt += 1
        low = base * (1 - self.jitter)
        return min(self.max_s, self._rng.uniform(low, base * (1 + self.jitter)))

    def reset(self) -> None:
        """Back to the first delay (after a connection that worked)."""
        self.attempt = 0


def permanent(exc: MTError) -> bool:
    """Failures that retrying cannot fix, and must not hammer (a 2FA prompt, a changed key)."""
    return isinstance(exc, SSHAuthError | UnknownHostKeyError | ChangedHostKeyError)
