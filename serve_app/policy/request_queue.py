"""Bounded queues per class (three interactive ones with aging, and batch below them), and fair shares between tenants within a class: the dispatch
policy, free of Ray, HTTP and asyncio.

Time is always passed in, so the policy can be tested without sleeping.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.policy.fairness import TenantCounters
from serve_app.policy.priority import INTERACTIVE, Priority
from serve_app.policy.refusals import QueueFull


@dataclass(frozen=True)
class ClassLimits:
    max_queue_len: int
    max_wait_s: float


@dataclass(eq=False)
class Waiter:
    """One queued request; `payload` is whatever the caller needs to wake it."""

    priority: Priority
    enqueued_at: float
    seq: int
    payload: Any = field(default=None, repr=False)
    tenant: str = ""  # whose request (an API key's name, or the body's `user`); "" for anonymous

    def waited(self, now: float) -> float:
        return now - self.enqueued_at


class PriorityRequestQueue:
    """Pops high before medium before low, but a waiter gains one class per `aging_s` waited.

    Aging means a low request that has waited 2 * aging_s competes as a fresh high one, so a
    steady stream of high traffic cannot starve low forever. Within a class, each tenant's
    requests are FIFO; with `fairness`, the tenant with the smallest virtual token counter goes
    first, without it the oldest request does.
    """

    def __init__(
        self, limits: Mapping[Priority, ClassLimits], aging_s: float, fairness: TenantCounters | None = None
    ) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        missing = set(INTERACTIVE) - set(limits)
        if missing:
            raise ValueError(f"limits missing for {sorted(p.label for p in missing)}")
        self.limits = {Priority.BATCH: ClassLimits(0, 1.0), **limits}  # without its own limits, batch takes none
        self.aging_s = aging_s
        self.fairness = fairness
        self._queues: dict[Priority, dict[str, deque[Waiter]]] = {p: {} for p in Priority}
        self._depths = dict.fromkeys(Priority, 0)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(self._depths.values())

    def depth(self, priority: Priority) -> int:
        return self._depths[priority]

    def push(
        self,
        priority: Priority,
        now: float,
        payload: Any = None,
        retry_after_s: int = 1,
        front: bool = False,
        tenant: str = "",
    ) -> Waiter:
        """Raises QueueFull, carrying the caller's Retry-After estimate, when the class is at its bound.
        `front` puts a request that was already admitted once (and preempted) ahead of its class, past the bound."""
        tenants = self._queues[priority]
        if not front and self._depths[priority] >= self.limits[priority].max_queue_len:
            raise QueueFull(priority, retry_after_s)
        if self.fairness is not None:
            self.fairness.arrive(tenant, tenants)
        queue = tenants.setdefault(tenant, deque())
        if front:
            waiter = Waiter(priority, now, -next(self._seq), payload, tenant)
            queue.appendleft(waiter)
        else:
            waiter = Waiter(priority, now, next(self._seq), payload, tenant)
            queue.append(waiter)
        self._depths[priority] += 1
        return waiter

    def _head(self, priority: Priority) -> Waiter | None:
        """A preempted request first; then the least-served tenant's oldest (with fairness), or the oldest."""
        heads = [q[0] for q in self._queues[priority].values()]
        if self.fairness is None:
            return min(heads, key=lambda w: w.seq, default=None)
        counter = self.fairness.counter
        return min(heads, key=lambda w: (w.seq >= 0, counter(w.tenant), w.seq), default=None)

    def _take(self, waiter: Waiter) -> bool:
        tenants = self._queues[waiter.priority]
        queue = tenants.get(waiter.tenant)
        if queue is None:
            return False
        try:
            queue.remove(waiter)
        except ValueError:
            return False
        if not queue:
            del tenants[waiter.tenant]
        self._depths[waiter.priority] -= 1
        return True

    def effective_rank(self, waiter: Waiter, now: float) -> float:
        """Batch lines never age: however long they wait, interactive requests go first."""
        if waiter.priority is Priority.BATCH:
            return float(Priority.BATCH)
        return waiter.priority - waiter.waited(now) / self.aging_s

    def effective_class(self, waiter: Waiter, now: float) -> Priority:
        """The class a waiter counts as after aging, for the slots reserved to higher classes."""
        return Priority(max(0, math.ceil(self.effective_rank(waiter, now) - 1e-9)))

    def peek(self, now: float) -> Waiter | None:
        """Only class heads compete: within a class, the head is the request that should go first."""
        heads = [h for p in Priority if (h := self._head(p)) is not None]
        return min(heads, key=lambda w: (self.effective_rank(w, now), w.seq), default=None)

    def pop(self, now: float) -> Waiter | None:
        best = self.peek(now)
        if best is not None:
            self._take(best)
        return best

    def remove(self, waiter: Waiter) -> bool:
        """Drop a waiter whose client went away; False if it already left the queue."""
        return self._take(waiter)

    def pop_expired(self, now: float) -> list[Waiter]:
        """Remove and return every waiter that has waited past its class's max wait."""
        expired: list[Waiter] = []
        for priority, tenants in self._queues.items():
            max_wait = self.limits[priority].max_wait_s
            for queue in list(tenants.values()):
                while queue and queue[0].waited(now) >= max_wait:
                    expired.append(queue[0])
                    self._take(queue[0])
        return expired
