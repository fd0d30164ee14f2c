"""Per-connection message rate limit (token bucket). Pure logic, injectable clock."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Allows `rate` messages a second on average and bursts of up to `burst`."""

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate", "strikes")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()
        # Refusals since the last allowed message: a client that keeps going is flooding.
        self.strikes = 0

    def allow(self, cost: float = 1.0) -> bool:
        """Take `cost` tokens (a batch of messages) if there are that many; False leaves them all."""
        now = self._clock()
        tokens = self._tokens + (now - self._last) * self.rate
        self._last = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens >= cost:
            self._tokens = tokens - cost
            self.strikes = 0
            return True
        self._tokens = tokens
        self.strikes += 1
        return False

    def seconds_until(self, cost: float = 1.0) -> float:
        """How long until `cost` tokens are there (as of the last `allow`): a Retry-After."""
        return max(0.0, (cost - self._tokens) / self.rate) if self.rate > 0 else float("inf")
