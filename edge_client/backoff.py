"""Retry schedule for network calls: capped exponential backoff with full jitter (pure, no sleeping here).

delay(n) = U(0, min(cap_s, base_s · 2ⁿ)) seconds before retry n (n = 0 for the first retry). Full jitter spreads
clients that failed together (an aggregator restart) over the whole window instead of synchronising their retries
("Exponential Backoff And Jitter", AWS Architecture Blog, 2015).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from prufed.common.errors import ConfigError


@dataclass(frozen=True)
class BackoffPolicy:
    """base_s: first window (s); cap_s: largest window (s); max_attempts: calls in all, first try included."""

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_s) and self.base_s > 0):
            raise ConfigError("--retry-base", f"must be a positive number of seconds, got {self.base_s}")
        if not (math.isfinite(self.cap_s) and self.cap_s >= self.base_s):
            raise ConfigError("--retry-cap", f"must be >= the base ({self.base_s} s), got {self.cap_s}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError("--retry-attempts", f"must be an integer >= 1, got {self.max_attempts!r}")

    def window(self, retry: int) -> float:
        """Upper bound of the delay before retry `retry` (0-based): min(cap, base · 2^retry) seconds."""
        if retry < 0:
            raise ValueError(f"retry must be >= 0, got {retry}")
        # 2**retry overflows float for huge counts; the cap is reached long before 64 doublings.
        return min(self.cap_s, self.base_s * 2.0 ** min(retry, 64))

    def delay(self, retry: int, rng: random.Random) -> float:
        """The jittered delay before retry `retry`: uniform in [0, window(retry)]."""
        return rng.uniform(0.0, self.window(retry))

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The max_attempts − 1 delays between the attempts of one call."""
        for retry in range(self.max_attempts - 1):
            yield self.delay(retry, rng)
