"""Slots held for the higher classes: a fixed share of each replica's limit, or for high, by default, slots on
top of the limit as many as its measured demand needs.

High's reserve follows Little's law: the slots high occupies on average are its arrival rate times the time it
holds a slot (L = λ·W), and the reserve is that plus two standard deviations of a Poisson count (L + 2·√L), so a
high request finds a slot at once about 98% of the time. These slots come on top of `max_ongoing_requests`
rather than out of it: the engine schedules by priority, so a high request sent to a full engine is the first of
its queue and runs as soon as any sequence ends, while medium and low keep every slot the engine can run.
Measured on an H200 at 0.7x capacity with short prompts, a reserve taken out of the 256 slots queued medium and
low in the gateway while the engine had room (docs/benchmarks.md, seventh session). Pure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serve_app.policy.priority import Priority


@dataclass(frozen=True)
class Reservation:
    """`shares[k]`: the part of each replica's limit that only class k and the classes above it may use;
    `high_from_demand`: high's part is `Demand.reserve` slots instead of a share.

    `hold_s`: a share is held back only while a class it is for has arrived within the last `hold_s` seconds
    (None: always). Without it, a gateway that sees no high request still idles high's share: measured on an
    H200, an all-medium load at 256 concurrent ran 230 at a time and gave 0.76x bare vLLM's tokens/s."""

    shares: Mapping[Priority, float] = field(default_factory=dict)
    hold_s: float | None = None
    high_from_demand: bool = False

    @classmethod
    def for_classes(cls, high: float | str = 0.0, medium: float = 0.0, hold_s: float | None = None) -> Reservation:
        """`high`: share only high may use, or "auto" (from its demand); `medium`: a further share high and
        medium may use, low may not."""
        auto = high == "auto"
        high_share = 0.0 if auto else float(high)
        if high_share < 0 or medium < 0 or high_share + medium >= 1:
            raise ValueError("reserved shares must be >= 0 and leave low part of the slots")
        if hold_s is not None and hold_s <= 0:
            raise ValueError("hold_s must be positive, or None to hold the shares always")
        return cls({Priority.HIGH: high_share, Priority.MEDIUM: medium}, hold_s, auto)

    def allowed(
        self,
        limit: int,
        priority: Priority,
        in_use: Callable[[Priority], bool] | None = None,
        high_slots: int = 0,
    ) -> int:
        """Slots that `priority` may fill on a replica of `limit`: all but the shares of the classes above it
        that are in use (`in_use(k)`: a request of class k or above arrived lately; None: all are), and for high
        its `high_slots` on top when its reserve comes from demand. At least one, so a class never waits on an
        idle replica."""
        if priority == Priority.HIGH and self.high_from_demand and limit > 0:
            return limit + high_slots
        reserved = 0.0
        for k, share in self.shares.items():
            if k < priority and (in_use is None or in_use(k)):
                reserved += limit * share
        if reserved <= 0 or limit <= 1:
            return limit
        return max(1, limit - math.ceil(round(reserved, 9)))


MIN_COUNTED_S = 0.25


class Demand:
    """One class's demand for slots: its arrival rate (an exponentially decayed count over `window_s`, corrected
    for the time it has been counting since it was last idle for a window, so that a load that has just started
    is not read as a third of itself) times its mean slot time (a moving average over its releases)."""

    def __init__(self, window_s: float = 10.0, alpha: float = 0.1) -> None:
        self.window_s = window_s
        self._alpha = alpha
        self._count = 0.0
        self._at: float | None = None
        self._since: float | None = None
        self.mean_slot_s: float | None = None

    def arrived(self, now: float) -> None:
        if self._at is None or now - self._at > self.window_s:  # the first, or after an idle spell: count anew
            self._since, self._count = now, 0.0
        self._count = self._decayed(now) + 1.0
        self._at = now

    def served(self, slot_s: float) -> None:
        if slot_s < 0 or not math.isfinite(slot_s):
            return
        mean = self.mean_slot_s
        self.mean_slot_s = slot_s if mean is None else (1 - self._alpha) * mean + self._alpha * slot_s

    def rate(self, now: float) -> float:
        if self._since is None:
            return 0.0
        # The decayed count of a steady rate λ after t seconds is λ·w·(1 - e^(-t/w)): divide by that, not by w.
        # At least MIN_COUNTED_S of counting, so that one arrival is not read as a burst. Short, since reading
        # too much costs little: high's reserve is on top of the slots, where over-reading only lets a few more
        # high requests wait in the engine's queue instead of the gateway's, while reading too little in the
        # first second of a burst keeps high in the gateway's queue (422 ms p99 on an H200 at 1.5x capacity).
        counted_s = max(now - self._since, MIN_COUNTED_S)
        return self._decayed(now) / (self.window_s * -math.expm1(-counted_s / self.window_s))

    def concurrency(self, now: float) -> float:
        """L = λ·W: the slots this class holds on average."""
        return self.rate(now) * (self.mean_slot_s if self.mean_slot_s is not None else 0.0)

    def reserve(self, now: float, replicas: int) -> int:
        """Slots to hold on each of `replicas` replicas: L + 2·√L of this class's share there, at least one."""
        if replicas <= 0:
            return 0
        share = self.concurrency(now) / replicas
        return max(1, math.ceil(share + 2 * math.sqrt(share)))

    def _decayed(self, now: float) -> float:
        if self._at is None:
            return 0.0
        return self._count * math.exp(-max(now - self._at, 0.0) / self.window_s)
