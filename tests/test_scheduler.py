"""The Scheduler: the asyncio slots and waiters around the queue policy, with real (millisecond) timers."""

import asyncio

import pytest

from serve_app.deployments.scheduler import SHED_AFTER_SAMPLES, NotReady, QueueFull, QueueTimeout, Scheduler, Shed, Slot
from serve_app.policy.priority import Priority
from serve_app.policy.replica_set import ReplicaSet, Reservation
from serve_app.policy.request_queue import ClassLimits, PriorityRequestQueue
from serve_app.policy.token_load import PrefillBudget, PromptShape


def make_admission(capacity: int, max_len: int = 10, max_wait_s: float = 5.0, **kwargs) -> Scheduler:
    queue = PriorityRequestQueue({p: ClassLimits(max_len, max_wait_s) for p in Priority}, aging_s=60)
    replicas = ReplicaSet(kwargs.pop("reservation", None), kwargs.pop("budget", None))
    if capacity:
        replicas.add("r0", "http://r0", capacity)
    return Scheduler(queue, replicas, shed=kwargs.pop("shed", False), **kwargs)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_grants_at_once_while_slots_are_free():
    adm = make_admission(capacity=2)
    a = await adm.acquire(Priority.LOW)
    b = await adm.acquire(Priority.LOW)
    assert adm.in_flight == 2
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
    assert adm.in_flight == 0


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
    assert adm.in_flight == 0


async def test_cancel_after_grant_gives_the_slot_back():
    adm = make_admission(capacity=1)
    held = await adm.acquire(Priority.MEDIUM)
    waiting = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    adm.release(held)  # grants the slot to `waiting`, whose task has not run yet
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert adm.in_flight == 0


async def test_raising_capacity_wakes_waiters():
    adm = make_admission(capacity=1)
    await adm.acquire(Priority.LOW)
    waiting = asyncio.create_task(adm.acquire(Priority.LOW))
    await settle()
    assert not waiting.done()
    adm.replicas.add("r1", "http://r1", 1)
    adm.replicas_changed()
    slot = await asyncio.wait_for(waiting, 1)
    assert adm.in_flight == 2 and slot.queue_wait_s >= 0


async def test_a_high_request_gets_a_reserved_slot_while_lows_wait():
    adm = make_admission(capacity=4, reservation=Reservation.for_classes(high=0.5))
    running = [await adm.acquire(Priority.LOW) for _ in range(2)]
    low = asyncio.create_task(adm.acquire(Priority.LOW))
    await settle()
    assert not low.done(), "low may fill only half of the slots"
    high = await asyncio.wait_for(adm.acquire(Priority.HIGH), 1)
    assert high.queue_wait_s == 0 and adm.in_flight == 3
    adm.release(running[0])
    await settle()
    assert not low.done(), "a low may start only below the reserved share, whoever holds the slots"
    adm.release(high)
    await asyncio.wait_for(low, 1)


async def test_with_no_high_in_use_medium_fills_every_slot_and_high_takes_the_next_free_one():
    clock = [0.0]
    reserved = Reservation.for_classes(high=0.5, hold_s=30)
    adm = make_admission(capacity=4, reservation=reserved, clock=lambda: clock[0])
    running = [await asyncio.wait_for(adm.acquire(Priority.MEDIUM), 1) for _ in range(4)]
    assert adm.in_flight == 4, "no high seen: nothing is held back"
    high = asyncio.create_task(adm.acquire(Priority.HIGH))
    medium = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    adm.release(running[0])
    await asyncio.wait_for(high, 1)
    for slot in running[1:3]:
        adm.release(slot)
        await settle()
        assert not medium.done(), "high is in use now: medium waits until the replica runs below its share"
    adm.release(running[3])
    await asyncio.wait_for(medium, 1)
    clock[0] = 31.0
    late = await asyncio.wait_for(adm.acquire(Priority.MEDIUM), 1)
    assert late.queue_wait_s == 0, "high last came 31 s ago: its share is open"


async def test_a_lapsed_share_goes_to_the_waiters_before_a_new_arrival():
    clock = [0.0]
    adm = make_admission(capacity=4, reservation=Reservation.for_classes(high=0.5, hold_s=30), clock=lambda: clock[0])
    await asyncio.wait_for(adm.acquire(Priority.HIGH), 1)
    await asyncio.wait_for(adm.acquire(Priority.MEDIUM), 1)
    queued = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    assert not queued.done(), "high is in use: medium may run 2 of 4, and 2 run"
    clock[0] = 31.0
    newcomer = await asyncio.wait_for(adm.acquire(Priority.MEDIUM), 1)
    assert queued.done() and queued.result().dispatch_seq < newcomer.dispatch_seq, "the waiter came first"


async def test_a_share_that_lapses_with_nothing_else_happening_still_reaches_the_waiters():
    adm = make_admission(capacity=4, reservation=Reservation.for_classes(high=0.5, hold_s=0.2))  # real clock
    await asyncio.wait_for(adm.acquire(Priority.HIGH), 1)
    await asyncio.wait_for(adm.acquire(Priority.MEDIUM), 1)
    queued = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    assert not queued.done(), "high is in use: medium may run 2 of 4, and 2 run"
    slot = await asyncio.wait_for(queued, 5)  # no release, no arrival: the lapse itself dispatches
    assert adm.in_flight == 3 and slot.queue_wait_s > 0


async def test_a_request_that_would_wait_past_its_bound_is_refused_at_arrival():
    clock = [0.0]
    adm = make_admission(capacity=1, max_wait_s=5.0, shed=True, clock=lambda: clock[0], initial_service_s=2.0)
    for _ in range(SHED_AFTER_SAMPLES):  # each request held 2 s: the gateway drains 0.5 requests/s
        slot = await adm.acquire(Priority.LOW)
        clock[0] += 2.0
        adm.release(slot)
    await adm.acquire(Priority.LOW)
    first = asyncio.create_task(adm.acquire(Priority.LOW))  # predicted 2 s: queued
    await settle()
    assert not first.done()
    second = asyncio.create_task(adm.acquire(Priority.LOW))  # predicted 4 s: queued
    await settle()
    assert not second.done()
    with pytest.raises(Shed) as excinfo:  # predicted 6 s, past the 5 s bound: refused now
        await adm.acquire(Priority.LOW)
    assert excinfo.value.retry_after_s == 1
    assert adm.shed_count[Priority.LOW] == 1
    high = asyncio.create_task(adm.acquire(Priority.HIGH))  # nothing ahead of high: it queues
    await settle()
    assert not high.done() and adm.shed_count[Priority.HIGH] == 0
    for task in (first, second, high):
        task.cancel()


async def test_a_waiting_high_request_asks_for_the_youngest_low_to_be_preempted():
    asked: list[Slot] = []
    clock = [0.0]
    adm = make_admission(capacity=2, preempt_window_s=1.0, on_preempt=asked.append, clock=lambda: clock[0])
    old_low = await adm.acquire(Priority.LOW)
    clock[0] = 5.0
    young_low = await adm.acquire(Priority.LOW)
    high = asyncio.create_task(adm.acquire(Priority.HIGH))
    await settle()
    assert asked == [young_low], "only the low granted within the window, and only once"
    another = asyncio.create_task(adm.acquire(Priority.HIGH))
    await settle()
    assert asked == [young_low], "the old low has surely started: it is never asked"
    adm.release(young_low)  # the Router gave it up
    assert (await asyncio.wait_for(high, 1)).priority is Priority.HIGH
    assert adm.preempt_asks[Priority.LOW] == 1
    adm.release(old_low)
    await asyncio.wait_for(another, 1)


async def test_a_first_token_frees_prefill_budget_and_a_waiting_medium_goes():
    adm = make_admission(capacity=8, budget=PrefillBudget(seconds=1.0, min_tokens=1000))
    replica = adm.replicas.get("r0")
    replica.prefill_rate.observe(2000, 1.0)  # 2k tokens/s measured: a budget of 2k pending tokens
    long_prompt = [PromptShape(chars=6000)] * 3  # 1,500 tokens each; no block hashes: nothing shared
    first = await adm.acquire(Priority.MEDIUM, shape=long_prompt[0])
    second = await adm.acquire(Priority.MEDIUM, shape=long_prompt[1])  # 1,500 pending < 2,000: room left
    waiting = asyncio.create_task(adm.acquire(Priority.MEDIUM, shape=long_prompt[2]))
    await settle()
    assert not waiting.done(), "3,000 tokens pending: the third waits in the gateway, though 6 slots are free"
    high = await asyncio.wait_for(adm.acquire(Priority.HIGH, shape=long_prompt[2]), 1)  # never held by it
    adm.first_token(first, seconds=1.0)
    assert replica.prefill_rate.tokens_per_s == 2000 * 0.99, "1,500 tokens in 1 s: below the max, which decays"
    await settle()
    assert not waiting.done(), "1,500 + 1,500 (high's) still pending"
    adm.first_token(second, seconds=1.0)
    slot = await asyncio.wait_for(waiting, 1)
    assert slot.queue_wait_s >= 0 and replica.load.pending_prefill == 3000
    for done in (first, second, high, slot):
        adm.release(done)
    assert adm.in_flight == 0 and replica.load.pending_prefill == 0 and replica.load.kv_tokens == 0


async def test_waiters_get_not_ready_at_once_when_the_last_replica_goes():
    adm = make_admission(capacity=1)
    await adm.acquire(Priority.MEDIUM)
    waiting = asyncio.create_task(adm.acquire(Priority.MEDIUM))
    await settle()
    adm.replicas.remove("r0")
    adm.replicas_changed()
    with pytest.raises(NotReady):
        await asyncio.wait_for(waiting, 1)
    assert len(adm.queue) == 0
