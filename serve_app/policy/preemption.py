"""Which running request to give up for a waiting high one: pure choice over the granted slots.

Only a request that has not sent its first token may go: its client has seen nothing, so an abort
in the engine and a fresh start later cost it nothing but delay. The Router that holds it has the
last word (it knows whether a byte went out); the gateway only picks a candidate: the most
recently granted request of the lowest class, granted within `window_s`, so most likely still in
its prefill, and not already asked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from serve_app.policy.priority import Priority

# An ask that the Router has not answered by releasing the slot within this time counts as refused.
ASK_TTL_S = 2.0


class Preemptible(Protocol):
    priority: Priority
    granted_at: float
    preempt_asked_at: float | None


def pending_asks(grants: Iterable[Preemptible], now: float) -> int:
    return sum(1 for g in grants if g.preempt_asked_at is not None and now - g.preempt_asked_at < ASK_TTL_S)


def choose_victim(grants: Iterable[Preemptible], waiting: Priority, now: float, window_s: float) -> Preemptible | None:
    candidates = [
        g for g in grants if g.priority > waiting and g.preempt_asked_at is None and now - g.granted_at <= window_s
    ]
    return max(candidates, key=lambda g: (g.priority, g.granted_at), default=None)
