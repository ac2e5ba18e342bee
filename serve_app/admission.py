"""Asyncio glue around the queue policy: dispatch slots on the registered replicas, waiters, timeouts.

One slot is held per request sent to an LLM replica. When every slot is busy, requests wait in
the priority queue; a slot freed by `release`, or added by a new replica, goes to the queue's pick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from serve_app.priority import Priority
from serve_app.replica_set import Replica, ReplicaSet
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
    replica: Replica


class Admission:
    def __init__(
        self,
        queue: PriorityRequestQueue,
        replicas: ReplicaSet | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial_service_s: float = 1.0,
    ) -> None:
        self.queue = queue
        self.replicas = replicas if replicas is not None else ReplicaSet()
        self._clock = clock
        self._mean_service_s = initial_service_s
        self._dispatched = 0

    @property
    def capacity(self) -> int:
        return self.replicas.capacity

    @property
    def in_use(self) -> int:
        return self.replicas.in_flight

    def replicas_changed(self) -> None:
        """Call after adding or removing replicas: new slots go to waiters at once."""
        self._dispatch()

    def retry_after(self, priority: Priority) -> int:
        ahead = sum(self.queue.depth(p) for p in Priority if p <= priority)
        return estimate_retry_after(ahead, self.capacity, self._mean_service_s, self.queue.limits[priority].max_wait_s)

    async def acquire(self, priority: Priority) -> Slot:
        """Wait for a slot. Raises NotReady, QueueFull or QueueTimeout; cancellation leaves the queue at once."""
        if self.capacity == 0:
            raise NotReady("no LLM replica is ready to serve yet")
        now = self._clock()
        if len(self.queue) == 0 and (replica := self.replicas.take()) is not None:
            return self._grant(priority, now, now, replica)
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
        self.replicas.give_back(slot.replica)
        service_s = self._clock() - slot.granted_at
        self._mean_service_s = 0.8 * self._mean_service_s + 0.2 * service_s
        self._dispatch()

    def _grant(self, priority: Priority, enqueued_at: float, now: float, replica: Replica) -> Slot:
        self._dispatched += 1
        return Slot(priority, now - enqueued_at, now, self._dispatched, replica)

    def _dispatch(self) -> None:
        while len(self.queue):
            replica = self.replicas.take()
            if replica is None:
                return
            now = self._clock()
            waiter = self.queue.pop(now)
            future: asyncio.Future[Slot] | None = waiter.payload if waiter else None
            if future is None or future.done():
                self.replicas.give_back(replica)
                continue
            future.set_result(self._grant(waiter.priority, waiter.enqueued_at, now, replica))

    def _expire_waiters(self) -> None:
        now = self._clock()
        for waiter in self.queue.pop_expired(now):
            future: asyncio.Future[Slot] = waiter.payload
            if not future.done():
                retry = self.retry_after(waiter.priority)
                future.set_exception(QueueTimeout(waiter.priority, waiter.waited(now), retry))
