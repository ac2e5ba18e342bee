"""Three bounded FIFO queues with aging: the dispatch policy, free of Ray, HTTP and asyncio.

Time is always passed in, so the policy can be tested without sleeping.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.priority import Priority


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

    def waited(self, now: float) -> float:
        return now - self.enqueued_at


class QueueFull(Exception):
    def __init__(self, priority: Priority, retry_after_s: int) -> None:
        super().__init__(f"the {priority.label} priority queue is full")
        self.priority = priority
        self.retry_after_s = retry_after_s


class PriorityRequestQueue:
    """Pops high before medium before low, but a waiter gains one class per `aging_s` waited.

    Aging means a low request that has waited 2 * aging_s competes as a fresh high one, so a
    steady stream of high traffic cannot starve low forever. Within a class the order is FIFO.
    """

    def __init__(self, limits: Mapping[Priority, ClassLimits], aging_s: float) -> None:
        if aging_s <= 0:
            raise ValueError("aging_s must be positive")
        missing = set(Priority) - set(limits)
        if missing:
            raise ValueError(f"limits missing for {sorted(p.label for p in missing)}")
        self.limits = dict(limits)
        self.aging_s = aging_s
        self._queues: dict[Priority, deque[Waiter]] = {p: deque() for p in Priority}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def depth(self, priority: Priority) -> int:
        return len(self._queues[priority])

    def push(
        self, priority: Priority, now: float, payload: Any = None, retry_after_s: int = 1, front: bool = False
    ) -> Waiter:
        """Raises QueueFull, carrying the caller's Retry-After estimate, when the class is at its bound.
        `front` puts a request that was already admitted once (and preempted) ahead of its class, past the bound."""
        queue = self._queues[priority]
        if front:
            waiter = Waiter(priority, now, -next(self._seq), payload)
            queue.appendleft(waiter)
            return waiter
        if len(queue) >= self.limits[priority].max_queue_len:
            raise QueueFull(priority, retry_after_s)
        waiter = Waiter(priority, now, next(self._seq), payload)
        queue.append(waiter)
        return waiter

    def effective_rank(self, waiter: Waiter, now: float) -> float:
        return waiter.priority - waiter.waited(now) / self.aging_s

    def effective_class(self, waiter: Waiter, now: float) -> Priority:
        """The class a waiter counts as after aging, for the slots reserved to higher classes."""
        return Priority(max(0, math.ceil(self.effective_rank(waiter, now) - 1e-9)))

    def peek(self, now: float) -> Waiter | None:
        """Only class heads compete: within a class the head has waited longest (or was preempted)."""
        heads = [q[0] for q in self._queues.values() if q]
        return min(heads, key=lambda w: (self.effective_rank(w, now), w.seq), default=None)

    def pop(self, now: float) -> Waiter | None:
        best = self.peek(now)
        if best is not None:
            self._queues[best.priority].popleft()
        return best

    def remove(self, waiter: Waiter) -> bool:
        """Drop a waiter whose client went away; False if it already left the queue."""
        try:
            self._queues[waiter.priority].remove(waiter)
        except ValueError:
            return False
        return True

    def pop_expired(self, now: float) -> list[Waiter]:
        """Remove and return every waiter that has waited past its class's max wait."""
        expired: list[Waiter] = []
        for priority, queue in self._queues.items():
            max_wait = self.limits[priority].max_wait_s
            while queue and queue[0].waited(now) >= max_wait:
                expired.append(queue.popleft())
        return expired
