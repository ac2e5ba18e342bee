"""Which running request to give up for a waiting high one: pure choice over the granted slots.

Only a request that has not sent its first token may go: its client has seen nothing, so an abort
in the engine and a fresh start later cost it nothing but delay. The Router that holds it has the
last word (it knows whether a byte went out); the gateway only picks a candidate: the most
recently granted request of the lowest class, granted within `window_s`, whose first token has not
come back (`prefilling`, from the Routers' reports), and not already asked. `victim_for` says when to ask at all: for a waiting high
request that no slot is on its way to.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol, TypeVar

from serve_app.policy.priority import Priority

# An ask that the Router has not answered by releasing the slot within this time counts as refused.
ASK_TTL_S = 2.0


class Preemptible(Protocol):
    priority: Priority
    granted_at: float
    preempt_asked_at: float | None

    @property
    def prefilling(self) -> bool: ...


G = TypeVar("G", bound=Preemptible)


def pending_asks(grants: Iterable[Preemptible], now: float) -> int:
    return sum(1 for g in grants if g.preempt_asked_at is not None and now - g.preempt_asked_at < ASK_TTL_S)


def choose_victim(grants: Iterable[G], waiting: Priority, now: float, window_s: float) -> G | None:
    candidates = [
        g
        for g in grants
        if g.priority > waiting and g.preempt_asked_at is None and now - g.granted_at <= window_s and g.prefilling
    ]
    return max(candidates, key=lambda g: (g.priority, g.granted_at), default=None)


def victim_for(
    waiting: Priority, high_can_be_placed: bool, high_waiting: int, grants: Collection[G], now: float, window_s: float
) -> G | None:
    """The request to ask to give up its slot for a waiting request of class `waiting`, or None. Only a high
    one preempts, only when no replica has room for high (`high_can_be_placed`: a slot is free for it), and
    only while more high requests wait (`high_waiting`) than asks are pending: one ask per high waiter."""
    if waiting != Priority.HIGH or high_can_be_placed:
        return None
    if high_waiting <= pending_asks(grants, now):
        return None
    return choose_victim(grants, Priority.HIGH, now, window_s)
