"""Asyncio glue around the queue policy: a fixed number of dispatch slots, waiters, timeouts.

The router holds one slot per request it has sent to an LLM replica. When every slot is busy,
requests wait in the priority queue; a slot freed by `release` goes to the queue's pick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.priority import Priority
from serve_app.request_queue import PriorityRequestQueue, QueueFull, estimate_retry_after

__all__ = ["Admission", "NotReady", "QueueFull", "QueueTimeout", "Slot"]


class NotReady(Exception):
    """No LLM replica can take work yet (starting up, or all gone)."""


class QueueTimeout(Exception):
    def __init__(self, priority: Priority, waited_s: float, retry_after_s: int) -> None:
        super().__init__(f"waited {waited_s:.1f}s in the {priority.label} priority queue without a free replica slot")
        self.priority = priority
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


@dataclass
class Slot:
    priority: Priority
    queue_wait_s: float
    granted_at: float
    dispatch_seq: int


class Admission:
    def __init__(
        self,
        queue: PriorityRequestQueue,
        capacity: int = 0,
        clock: Callable[[], float] = time.monotonic,
        initial_service_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.capacity = capacity
        self.in_use = 0
        self._clock = clock
        self._mean_service_s = initial_service_s
        self._dispatched = 0

    def set_capacity(self, capacity: int) -> None:
        self.capacity = max(capacity, 0)
        self._dispatch()

    def retry_after(self, priority: Priority) -> int:
        ahead = sum(self.queue.depth(p) for p in Priority if p <= priority)
        return estimate_retry_after(ahead, self.capacity, self._mean_service_s, self.queue.limits[priority].max_wait_s)

    async def acquire(self, priority: Priority) -> Slot:
        """Wait for a slot. Raises NotReady, QueueFull or QueueTimeout; cancellation leaves the queue at once."""
        if self.capacity == 0:
            raise NotReady("no LLM replica is ready to serve yet")
        now = self._clock()
        if self.in_use < self.capacity and len(self.queue) == 0:
            return self._grant(priority, now, now)
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        waiter = self.queue.push(priority, now, future, retry_after_s=self.retry_after(priority))
        timer = asyncio.get_running_loop().call_later(
            # A hair past the bound, so the sweep never runs before the waiter is due.
            self.queue.limits[priority].max_wait_s + 0.001,
            self._expire_waiters,
        )
        try:
            return await future
        except asyncio.CancelledError:
            if not self.queue.remove(waiter) and future.done() and not future.cancelled():
                if future.exception() is None:
                    self.release(future.result())
            raise
        finally:
            timer.cancel()

    def release(self, slot: Slot) -> None:
        self.in_use -= 1
        service_s = self._clock() - slot.granted_at
        self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * service_s
        self._dispatch()

    def _grant(self, priority: Priority, enqueued_at: float, now: float) -> Slot:
        self.in_use += 1
        self._dispatched += 1
        return Slot(priority, now - enqueued_at, now, self._dispatched)

    def _dispatch(self) -> None:
        while self.in_use < self.capacity:
            now = self._clock()
            waiter = self.queue.pop(now)
            if waiter is None:
                return
            future: asyncio.Future[Slot] = waiter.payload
            if future.done():
                continue
            future.set_result(self._grant(waiter.priority, waiter.enqueued_at, now))

    def _expire_waiters(self) -> None:
        now = self._clock()
        for waiter in self.queue.pop_expired(now):
            future: asyncio.Future[Slot] = waiter.payload
            if not future.done():
                retry = self.retry_after(waiter.priority)
                future.set_exception(QueueTimeout(waiter.priority, waiter.waited(now), retry))
