"""Per-key rate limits: two token buckets per key, one for requests, one for LLM tokens.

A bucket holds up to ``capacity`` and refills at ``capacity`` per minute. A request takes one
from the requests bucket before it is forwarded; its tokens (prompt + completion, from the
upstream's ``usage``) are taken from the tokens bucket after it is done, which may drive it
below zero: the next requests wait until it is back above zero. So in any window of ``w``
seconds a key gets at most ``capacity + rate·w`` requests through.

Buckets live in ``Limiter``, keyed by key name, and survive a ``keys.yaml`` reload; a key
whose limits change starts with fresh, full buckets. The clock is passed in (tests use
their own). With several gateway replicas the same buckets live in Redis
(``gateway.redislimits``), and these are each replica's own while Redis is unreachable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

Clock = Callable[[], float]


class TokenBucket:
    """``capacity`` tokens, refilled continuously at ``rate_per_s``; the level may go negative."""

    __slots__ = ("_at", "_clock", "_level", "capacity", "rate_per_s")

    def __init__(self, capacity: float, rate_per_s: float, clock: Clock = time.monotonic) -> None:
        self.capacity = capacity
        self.rate_per_s = rate_per_s
        self._clock = clock
        self._level = capacity
        self._at = clock()

    def level(self) -> float:
        """What the bucket holds now (refilled up to now)."""
        now = self._clock()
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate_per_s)
            self._at = now
        return self._level

    def try_take(self, amount: float = 1.0) -> bool:
        """Take ``amount`` if the bucket holds that much; False (and nothing taken) if not."""
        if self.level() >= amount:
            self._level -= amount
            return True
        return False

    def debit(self, amount: float) -> None:
        """Take ``amount`` whatever the level (usage known only after the fact)."""
        self.level()
        self._level -= amount

    def wait_s(self, amount: float = 1.0) -> float:
        """Seconds until the bucket holds ``amount`` (0 if it does now)."""
        missing = amount - self.level()
        return max(0.0, missing / self.rate_per_s)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level()) / self.rate_per_s)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the limiter says about one request: allowed or not, and the headers to send."""

    allowed: bool
    retry_after_s: int
    headers: dict[str, str]
    limited: str | None = None  # "requests" or "tokens" when not allowed


# A bucket as its headers show it: kind, capacity, level now, seconds until full.
Shown = tuple[str, float, float, float]


class Spender(Protocol):
    """Where a finished request's tokens are charged: a key's buckets, here or in Redis."""

    def spend_tokens(self, count: int) -> None:
        """Charge ``count`` tokens of a finished request."""


def verdict(limited: str | None, wait_s: float, shown: Iterable[Shown]) -> Verdict:
    """The verdict on one request: refused for ``limited`` (``requests`` or ``tokens``,
    None if allowed) with ``wait_s`` until it may retry, and the ``x-ratelimit-*`` headers of
    each limited bucket, given as ``(kind, capacity, level, reset_s)``."""
    headers: dict[str, str] = {}
    for kind, capacity, level, reset_s in shown:
        headers[f"x-ratelimit-limit-{kind}"] = str(int(capacity))
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(level)))
        headers[f"x-ratelimit-reset-{kind}"] = _duration(reset_s)
    retry_after = max(1, math.ceil(wait_s)) if limited else 0
    return Verdict(limited is None, retry_after, headers, limited)


def _duration(seconds: float) -> str:
    # OpenAI's format for x-ratelimit-reset-*: "1s", "6m0s", "250ms".
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class KeyBuckets:
    """One key's buckets; ``None`` where the key has no such limit."""

    __slots__ = ("limits", "requests", "tokens")

    def __init__(self, rpm: int | None, tpm: int | None, clock: Clock) -> None:
        self.limits = (rpm, tpm)
        self.requests = TokenBucket(rpm, rpm / 60, clock) if rpm else None
        self.tokens = TokenBucket(tpm, tpm / 60, clock) if tpm else None

    def admit(self) -> Verdict:
        """Take one request if both buckets allow it."""
        requests, tokens = self.requests, self.tokens
        limited: str | None = None
        wait = 0.0
        if tokens is not None and tokens.level() < 1:
            limited, wait = "tokens", tokens.wait_s(1)
        elif requests is not None and not requests.try_take():
            limited, wait = "requests", requests.wait_s(1)
        shown = [
            (kind, bucket.capacity, bucket.level(), bucket.reset_s())
            for kind, bucket in (("requests", requests), ("tokens", tokens))
            if bucket is not None
        ]
        return verdict(limited, wait, shown)

    def spend_tokens(self, count: int) -> None:
        """Charge ``count`` tokens of a finished request."""
        if self.tokens is not None and count > 0:
            self.tokens.debit(count)


class Limiter:
    """The buckets of every key that has limits, by key name."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, KeyBuckets] = {}

    def buckets(self, name: str, rpm: int | None, tpm: int | None) -> KeyBuckets | None:
        """The buckets of key ``name`` with these limits (None if it has none)."""
        if rpm is None and tpm is None:
            return None
        found = self._keys.get(name)
        if found is None or found.limits != (rpm, tpm):
            found = self._keys[name] = KeyBuckets(rpm, tpm, self._clock)
        return found
