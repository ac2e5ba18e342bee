"""How many requests one replica should run at once: the knee of its throughput curve, from measured time per token.

A batching engine's time per output token grows with the batch: roughly t(c) = a + b*c, where `a`
is the unloaded time and `b` what each extra running request adds. The samples are each request's
service time (slot granted to last byte) over its output tokens: its prefill and its wait inside
the engine are part of what concurrency costs it. Its throughput c / t(c)
rises towards 1/b and flattens; past the knee, more concurrency buys little throughput and makes
every request slower, including a high-priority one that has just arrived. The limit is the
concurrency at which throughput reaches `knee_share` of that ceiling:

    c / (a + b*c) = knee_share / b   =>   c = knee_share / (1 - knee_share) * a / b

Requests beyond it wait in the gateway's priority queues, where order can be chosen, instead of
in the engine's batch. Pure: samples and time come in as numbers.
"""

from __future__ import annotations

import math


class KneeLimit:
    """`a` is the smallest time per token seen, `b` a weighted running ratio of the excess to the concurrency
    that caused it. A sample is already a mean over a request's tokens, so the minimum is not one lucky token;
    it does not drift up under load, which would erase the very slope it measures. Until both are known
    the limit is the upper bound, so a fresh replica never starts below what it was given."""

    def __init__(self, max_limit: int, min_limit: int = 1, knee_share: float = 0.85, alpha: float = 0.05) -> None:
        if not 0 < knee_share < 1:
            raise ValueError("knee_share must be between 0 and 1")
        if not 1 <= min_limit <= max_limit:
            raise ValueError("need 1 <= min_limit <= max_limit")
        self.max_limit = max_limit
        self.min_limit = min_limit
        self.knee_share = knee_share
        self._alpha = alpha
        self.unloaded_per_token_s: float | None = None
        self._excess = 0.0  # running sums of (t - a) and of concurrency, for the slope b
        self._weight = 0.0
        self.samples = 0
        self.limit = max_limit

    @property
    def slope_s(self) -> float | None:
        """Seconds per token that each running request adds (b)."""
        return self._excess / self._weight if self._weight > 0 else None

    def observe(self, concurrency: float, per_token_s: float) -> int:
        """One finished request: its service time per token, and the replica's concurrency while it ran. Returns
        the limit."""
        if per_token_s <= 0 or concurrency <= 0 or not math.isfinite(per_token_s):
            return self.limit
        self.samples += 1
        base = self.unloaded_per_token_s
        self.unloaded_per_token_s = per_token_s if base is None else min(base, per_token_s)
        if concurrency >= 2:
            excess = max(per_token_s - self.unloaded_per_token_s, 0.0)
            keep = 1 - self._alpha
            self._excess = keep * self._excess + self._alpha * excess
            self._weight = keep * self._weight + self._alpha * concurrency
        self.limit = self._knee()
        return self.limit

    def _knee(self) -> int:
        slope, base = self.slope_s, self.unloaded_per_token_s
        if slope is None or base is None or slope <= 0:
            return self.max_limit
        knee = self.knee_share / (1 - self.knee_share) * base / slope
        return int(min(max(math.floor(knee + 1e-9), self.min_limit), self.max_limit))
