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

# A knee more than this many times the concurrency the samples came from is an extrapolation from noise:
# at two running requests the slope b*c is a few percent of the time per token, smaller than a shared
# machine's jitter: one request slowed by 40% with two running gives a knee of 26, which held 9 of 32
# clients back for a whole answer on CPU (docs/qos.md). Past it, the limit stays at its bound, which costs
# nothing: a load far under the knee is not held back by it either way.
MAX_EXTRAPOLATION = 2.0


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
        self._loaded = 0  # samples taken with two or more requests running: the ones in those sums
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
            self._loaded += 1
        self.limit = self._knee()
        return self.limit

    @property
    def sampled_concurrency(self) -> float | None:
        """The (weighted) mean concurrency of the samples behind the slope."""
        if not self._loaded:
            return None
        return self._weight / (1 - (1 - self._alpha) ** self._loaded)

    def _knee(self) -> int:
        slope, base, seen = self.slope_s, self.unloaded_per_token_s, self.sampled_concurrency
        if slope is None or base is None or seen is None or slope <= 0:
            return self.max_limit
        knee = self.knee_share / (1 - self.knee_share) * base / slope
        if knee > MAX_EXTRAPOLATION * seen:
            return self.max_limit
        return int(min(max(math.floor(knee + 1e-9), self.min_limit), self.max_limit))
