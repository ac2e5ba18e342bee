"""Asyncio glue around the pure policies: dispatch slots on the registered replicas, waiters, timeouts.

One slot is held per request sent to an LLM replica. A request gets a slot at once when a replica
has room for its class (`replica_set`); otherwise it is refused at arrival if its predicted wait is
past its class's bound (`shedding`), or waits in the priority queue (`request_queue`), where a
high request may have a younger, not-yet-started lower one preempted for it (`preemption`). A
freed slot, a raised limit or a new replica goes to the queue's pick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_app.policy import shedding
from serve_app.policy.preemption import victim_for
from serve_app.policy.priority import Priority
from serve_app.policy.refusals import NotReady, QueueFull, QueueTimeout, Shed
from serve_app.policy.replica_set import Placement, Replica, ReplicaSet
from serve_app.policy.request_queue import PriorityRequestQueue
from serve_app.policy.shedding import SHED_AFTER_SAMPLES, DrainEstimate
from serve_app.policy.token_load import PromptShape

__all__ = ["Scheduler", "NotReady", "QueueFull", "QueueTimeout", "Shed", "Slot", "SHED_AFTER_SAMPLES"]


@dataclass(eq=False)
class Slot:
    priority: Priority
    queue_wait_s: float
    granted_at: float
    dispatch_seq: int
    placement: Placement
    pending_ahead: int  # prefill tokens pending ahead of it on its replica when it was granted
    owner: Any = None  # whatever the caller needs to reach the holder (the actor: router and request ids)
    tenant: str = ""
    charged: float = 0.0  # what the tenant's fair-share counter was charged at grant
    preempt_asked_at: float | None = field(default=None)

    @property
    def replica(self) -> Replica:
        return self.placement.replica

    @property
    def prefilling(self) -> bool:
        """No first token yet: preempting it costs its client nothing but delay."""
        return self.placement.work.prefilling


@dataclass(eq=False)
class _Wait:
    future: asyncio.Future[Slot]
    shape: PromptShape


class Scheduler:
    def __init__(
        self,
        queue: PriorityRequestQueue,
        replicas: ReplicaSet | None = None,
        clock: Callable[[], float] = time.monotonic,
        initial_service_s: float = 1.0,
        shed: bool = True,
        preempt_window_s: float | None = None,
        on_preempt: Callable[[Slot], None] | None = None,
    ) -> None:
        """`preempt_window_s`: how recently granted a lower request must be to be preempted for a waiting
        high one (None: never); `on_preempt` asks its holder to give it up."""
        self.queue = queue
        self.replicas = replicas if replicas is not None else ReplicaSet()
        self._clock = clock
        self._drain = DrainEstimate(initial_service_s)
        self._dispatched = 0
        self._shed = shed
        self._preempt_window_s = preempt_window_s
        self.on_preempt = on_preempt
        self.active: set[Slot] = set()
        self.preempt_asks = dict.fromkeys(Priority, 0)
        self.shed_count = dict.fromkeys(Priority, 0)
        self._lapse_timer: asyncio.TimerHandle | None = None
        self._lapse_at = 0.0

    @property
    def capacity(self) -> int:
        return self.replicas.capacity

    @property
    def in_flight(self) -> int:
        return self.replicas.in_flight

    def replicas_changed(self) -> None:
        """Call after adding or removing replicas: new slots go to waiters at once, and when no replica is
        left, every waiter learns it now (503, recovering) instead of timing out later as if overloaded."""
        if self.capacity == 0:
            while (waiter := self.queue.pop(self._clock())) is not None:
                future = waiter.payload.future
                if not future.done():
                    future.set_exception(NotReady("no LLM replica is left to serve"))
            return
        self._dispatch()

    def drain_rate(self) -> float:
        """Requests per second finishing when the replicas are busy: what runs now over the mean slot time
        (Little's law). What runs, not the slot bound: under a prefill budget fewer run than there are slots."""
        return self._drain.rate(max(self.replicas.in_flight, 1))

    def ahead_of(self, priority: Priority) -> int:
        return sum(self.queue.depth(p) for p in Priority if p <= priority)

    def retry_after(self, priority: Priority) -> int:
        return shedding.queue_retry_after_s(
            self.ahead_of(priority), self.drain_rate(), self.queue.limits[priority].max_wait_s
        )

    async def acquire(
        self, priority: Priority, front: bool = False, tenant: str = "", shape: PromptShape | None = None
    ) -> Slot:
        """Wait for a slot. Raises NotReady, Shed, QueueFull or QueueTimeout; cancellation leaves the queue at once.
        `front`: a preempted request going back to the head of its class; it is never shed. `tenant`: whose
        request, for fair shares within the class. `shape`: its prompt's size and prefix, for placing it."""
        shape = shape or PromptShape()
        if self.capacity == 0:
            raise NotReady("no LLM replica is ready to serve yet")
        now = self._clock()
        self.replicas.arrived(priority, now)
        if len(self.queue):  # a share may have lapsed since the last dispatch: waiters take that room first
            self._dispatch()
        # Whoever waits now could not be placed, and a waiter of a higher class would have been: so a free
        # slot for this class means no one waiting should have it first.
        if (placement := self.replicas.take(priority, now, shape)) is not None:
            return self._grant(priority, now, now, placement, tenant)
        if not front:
            self._shed_or_pass(priority)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Slot] = loop.create_future()
        waiter = self.queue.push(
            priority, now, _Wait(future, shape), retry_after_s=self.retry_after(priority), front=front, tenant=tenant
        )
        self._maybe_preempt(self.queue.effective_class(waiter, now), now)
        self._dispatch_when_a_share_lapses(now)
        # A hair past the bound, so the sweep never runs before the waiter is due.
        timer = loop.call_later(self.queue.limits[priority].max_wait_s + 0.001, self._expire_waiters)
        try:
            return await future
        except asyncio.CancelledError:
            if not self.queue.remove(waiter) and future.done() and not future.cancelled():
                if future.exception() is None:
                    self.release(future.result())
            raise
        finally:
            timer.cancel()

    def adopt(self, replica: Replica, priority: Priority, shape: PromptShape, tenant: str, prefilling: bool) -> Slot:
        """A slot for a request that already runs on `replica`: a Router tells a restarted Admission what it
        runs. It is granted whatever the room, so the replica may briefly hold more than its limit."""
        now = self._clock()
        self._dispatched += 1
        slot = Slot(priority, 0.0, now, self._dispatched, self.replicas.adopt(replica, priority, shape, prefilling), 0)
        slot.tenant = tenant
        self.active.add(slot)
        return slot

    def first_token(self, slot: Slot, seconds: float) -> None:
        """The request's first token came `seconds` after its grant: its prefill no longer loads its replica."""
        if slot not in self.active or not slot.prefilling:
            return
        self.replicas.first_token(slot.placement, seconds, slot.pending_ahead)
        self._dispatch()

    def release(self, slot: Slot, tokens: int | None = None) -> None:
        """`tokens`: its output tokens, which its tenant's fair share is charged (None: unknown)."""
        if slot not in self.active:
            return
        self.active.discard(slot)
        if self.queue.fairness is not None:
            self.queue.fairness.finished(slot.tenant, slot.charged, tokens)
        self.replicas.give_back(slot.placement)
        held_s = self._clock() - slot.granted_at
        self._drain.observe(held_s)
        if slot.priority == Priority.HIGH:
            self.replicas.high_demand.served(held_s)
        self._dispatch()

    def _shed_or_pass(self, priority: Priority) -> None:
        if not self._shed:
            return
        max_wait = self.queue.limits[priority].max_wait_s
        verdict = self._drain.shed(self.ahead_of(priority), self.replicas.limit, max_wait)
        if verdict is not None:
            predicted, retry_after_s = verdict
            self.shed_count[priority] += 1
            raise Shed(priority, predicted, max_wait, retry_after_s)

    def _grant(self, priority: Priority, enqueued_at: float, now: float, placement: Placement, tenant: str) -> Slot:
        self._dispatched += 1
        work = placement.work
        ahead = placement.replica.load.pending_ahead_of(work.priority) - work.prefill_tokens
        slot = Slot(priority, now - enqueued_at, now, self._dispatched, placement, max(ahead, 0), tenant=tenant)
        if self.queue.fairness is not None:
            slot.charged = self.queue.fairness.granted(tenant)
        self.active.add(slot)
        return slot

    def _dispatch(self) -> None:
        while len(self.queue):
            now = self._clock()
            waiter = self.queue.peek(now)
            assert waiter is not None
            wanted = self.queue.effective_class(waiter, now)
            wait: _Wait = waiter.payload
            placement = self.replicas.take(wanted, now, wait.shape)
            if placement is None:
                self._maybe_preempt(wanted, now)
                self._dispatch_when_a_share_lapses(now)
                return
            self.queue.pop(now)
            if wait.future.done():
                self.replicas.give_back(placement)
                continue
            wait.future.set_result(self._grant(waiter.priority, waiter.enqueued_at, now, placement, waiter.tenant))

    def _dispatch_when_a_share_lapses(self, now: float) -> None:
        """A held share opens with no release or arrival to dispatch it: one timer, for the next lapse."""
        at = self.replicas.next_release_of_shares(now)
        if at is None or (self._lapse_timer is not None and self._lapse_at <= at):
            return
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._lapse_at = at
        self._lapse_timer = loop.call_later(at - now + 0.001, self._on_share_lapse)

    def _on_share_lapse(self) -> None:
        self._lapse_timer = None
        self._dispatch()

    def _maybe_preempt(self, waiting: Priority, now: float) -> None:
        """One ask per high waiter that no slot is on its way to."""
        if self._preempt_window_s is None or self.on_preempt is None:
            return
        # A pass over the replicas, made only when it can matter: for any other class no one is asked.
        high_can_be_placed = waiting == Priority.HIGH and self.replicas.can_take(Priority.HIGH)
        victim = victim_for(
            waiting, high_can_be_placed, self.queue.depth(Priority.HIGH), self.active, now, self._preempt_window_s
        )
        if victim is None:
            return
        victim.preempt_asked_at = now
        self.preempt_asks[victim.priority] += 1
        self.on_preempt(victim)

    def _expire_waiters(self) -> None:
        now = self._clock()
        for waiter in self.queue.pop_expired(now):
            future = waiter.payload.future
            if not future.done():
                retry = self.retry_after(waiter.priority)
                future.set_exception(QueueTimeout(waiter.priority, waiter.waited(now), retry))
