"""The asyncio slot keeper around the queue policy, with real (millisecond) timers."""

import asyncio

import pytest

from serve_app.admission import Admission, NotReady, QueueFull, QueueTimeout
from serve_app.priority import Priority
from serve_app.replica_set import ReplicaSet
from serve_app.request_queue import ClassLimits, PriorityRequestQueue


def make_admission(capacity: int, max_len: int = 10, max_wait_s: float = 5.0) -> Admission:
    queue = PriorityRequestQueue({p: ClassLimits(max_len, max_wait_s) for p in Priority}, aging_s=60)
    replicas = ReplicaSet()
    if capacity:
        replicas.add("r0", "http://r0", capacity)
    return Admission(queue, replicas)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_grants_at_once_while_slots_are_free():
    adm = make_admission(capacity=2)
    a = await adm.acquire(Priority.LOW)
    b = await adm.acquire(Priority.LOW)
    assert adm.in_use == 2
    assert a.queue_wait_s == 0 and b.dispatch_seq == 2


async def test_no_capacity_means_not_ready():
    adm = make_admission(capacity=0)
    with pytest.raises(NotReady):
        await adm.acquire(Priority.HIGH)


async def test_freed_slot_goes_to_high_before_earlier_lows():
    adm = make_admission(capacity=1)
    running = await adm.acquire(Priority.LOW)
    order: list[str] = []

    async def client(name: str, priority: Priority) -> None:
        slot = await adm.acquire(priority)
        order.append(name)
        adm.release(slot)

    lows = [asyncio.create_task(client(f"low-{i}", Priority.LOW)) for i in range(3)]
    await settle()
    high = asyncio.create_task(client("high", Priority.HIGH))
    await settle()
    assert order == []
    adm.release(running)
    await asyncio.gather(high, *lows)
    assert order == ["high", "low-0", "low-1", "low-2"]
    assert adm.in_use == 0


async def test_full_queue_raises_with_retry_after():
    adm = make_admission(capacity=1, max_len=1)
    await adm.acquire(Priority.LOW)
    waiting = asyncio.create_task(adm.acquire(Priority.LOW))
    await settle()
    with pytest.raises(QueueFull) as excinfo:
        await adm.acquire(Priority.LOW)
    assert excinfo.value.retry_after_s >= 1
    waiting.cancel()


async def test_max_wait_times_out_and_leaves_the_queue():
    adm = make_admission(capacity=1, max_wait_s=0.05)
    await adm.acquire(Priority.MEDIUM)
    with pytest.raises(QueueTimeout) as excinfo:
        await adm.acquire(Priority.MEDIUM)
    assert excinfo.value.waited_s >= 0.05
    assert excinfo.value.retry_after_s >= 1
    assert len(adm.queue) == 0


async def test_cancelled_waiter_leaves_the_queue_at_once():
    adm = make_admission(capacity=1)
    held = await adm.acquire(Priority.MEDIUM)
    waiting = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    assert len(adm.queue) == 1
    waiting.cancel()
    await settle()
    assert len(adm.queue) == 0
    adm.release(held)
    assert adm.in_use == 0


async def test_cancel_after_grant_gives_the_slot_back():
    adm = make_admission(capacity=1)
    held = await adm.acquire(Priority.MEDIUM)
    waiting = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    adm.release(held)  # grants the slot to `waiting`, whose task has not run yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert adm.in_use == 0


async def test_raising_capacity_wakes_waiters():
    adm = make_admission(capacity=1)
    await adm.acquire(Priority.LOW)
    waiting = asyncio.create_task(adm.acquire(Priority.LOW))
    await settle()
    assert not waiting.done()
    adm.replicas.add("r1", "http://r1", 1)
    adm.replicas_changed()
    slot = await asyncio.wait_for(waiting, 1)
    assert adm.in_use == 2 and slot.queue_wait_s >= 0
