"""When to refuse a request at arrival, and what Retry-After to give: arithmetic on the measured drain rate.

The gateway drains at about `slots / mean_service_s` requests per second (Little's law, with the
service time measured from grant to release; `DrainEstimate` keeps that mean). A request that would wait behind `ahead` others
longer than its class's `max_wait_s` is better refused now, in milliseconds, with an honest
Retry-After, than queued until it times out. Pure: no Ray, no asyncio.
"""

from __future__ import annotations

import math

# Completed requests needed before the mean service time is trusted for shedding.
SHED_AFTER_SAMPLES = 8


def drain_rate(slots: int, mean_service_s: float) -> float:
    """Requests per second that the gateway's slots finish when all are busy."""
    return max(slots, 0) / mean_service_s if mean_service_s > 0 else 0.0


def predicted_wait_s(ahead: int, rate: float) -> float:
    """Seconds until this request gets a slot: the `ahead` requests served first, then its own turn."""
    return math.inf if rate <= 0 else (ahead + 1) / rate


def shed_retry_after_s(predicted_s: float, max_wait_s: float, cap_s: float = 600.0) -> int:
    """The time until enough of the queue has drained that a new request would be served within its max wait."""
    if not math.isfinite(predicted_s):
        return int(cap_s)
    return int(min(max(math.ceil(predicted_s - max_wait_s), 1), cap_s))


def queue_retry_after_s(ahead: int, rate: float, max_wait_s: float) -> int:
    """For a full queue or a timed-out wait: when the requests ahead will likely have drained, within
    [1 s, the class's max wait]."""
    wait = predicted_wait_s(ahead, rate)
    return int(min(max(math.ceil(wait) if math.isfinite(wait) else max_wait_s, 1), max(math.ceil(max_wait_s), 1)))


class DrainEstimate:
    """The mean service time, grant to release: a moving average that weighs each new sample 0.2, from
    `initial_service_s`; trusted for shedding once `trusted_after` requests have completed."""

    def __init__(self, initial_service_s: float = 1.0, trusted_after: int = SHED_AFTER_SAMPLES) -> None:
        self.mean_service_s = initial_service_s
        self.samples = 0
        self.trusted_after = trusted_after

    def observe(self, service_s: float) -> None:
        self.mean_service_s = 0.8 * self.mean_service_s + 0.2 * service_s
        self.samples += 1

    @property
    def trusted(self) -> bool:
        return self.samples >= self.trusted_after

    def rate(self, slots: int) -> float:
        return drain_rate(slots, self.mean_service_s)

    def shed(self, ahead: int, slots: int, max_wait_s: float) -> tuple[float, int] | None:
        """None: let the request queue (its wait is within `max_wait_s`, or the estimate is not trusted
        yet). Otherwise refuse it: (its predicted wait, the Retry-After to give)."""
        if not self.trusted:
            return None
        predicted = predicted_wait_s(ahead, self.rate(slots))
        if predicted <= max_wait_s:
            return None
        return predicted, shed_retry_after_s(predicted, max_wait_s)
