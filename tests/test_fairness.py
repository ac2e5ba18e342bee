"""Fair shares between tenants within a class: pure logic, milliseconds."""

from __future__ import annotations

import asyncio

from serve_app.deployments.scheduler import Scheduler
from serve_app.policy.fairness import TenantCounters
from serve_app.policy.priority import Priority
from serve_app.policy.replica_set import ReplicaSet
from serve_app.policy.request_queue import ClassLimits, PriorityRequestQueue

MEDIUM = Priority.MEDIUM


def fair_queue(counters: TenantCounters | None = None) -> PriorityRequestQueue:
    return PriorityRequestQueue({p: ClassLimits(100, 60) for p in Priority}, aging_s=60, fairness=counters)


def test_an_idle_tenant_comes_back_at_the_smallest_waiting_counter_not_with_banked_credit():
    counters = TenantCounters(initial_estimate=10)
    for _ in range(5):
        counters.granted("busy")
    counters.granted("other")
    counters.arrive("idle", waiting=["busy", "other"])
    assert counters.counter("idle") == counters.counter("other") == 10
    counters.arrive("busy", waiting=["busy", "other"])  # already waiting: not lifted, not lowered
    assert counters.counter("busy") == 50


def test_the_grant_charges_the_mean_answer_and_the_release_corrects_it():
    counters = TenantCounters(initial_estimate=10, alpha=0.5)
    charged = counters.granted("a")
    assert counters.counter("a") == 10
    counters.finished("a", charged, 30)
    assert counters.counter("a") == 30
    assert counters.estimate == 20, "the estimate moves toward the answers seen"
    counters.finished("a", counters.granted("a"), None)  # unknown (a cancelled request): the estimate stays
    assert counters.counter("a") == 50


def test_within_a_class_the_least_served_tenant_goes_first_and_each_tenant_stays_fifo():
    counters = TenantCounters(initial_estimate=10)
    queue = fair_queue(counters)
    for i in range(4):
        queue.push(MEDIUM, now=i, payload=f"heavy{i}", tenant="heavy")
    queue.push(MEDIUM, now=5, payload="light0", tenant="light")
    queue.push(MEDIUM, now=6, payload="light1", tenant="light")
    order = []
    while (waiter := queue.pop(now=7)) is not None:
        order.append(waiter.payload)
        counters.granted(waiter.tenant)
    assert order == ["heavy0", "light0", "heavy1", "light1", "heavy2", "heavy3"]
    assert len(queue) == 0 and queue.depth(MEDIUM) == 0


def test_without_fairness_the_class_is_fifo_across_tenants():
    queue = fair_queue(None)
    for i, tenant in enumerate(["a", "a", "b", "a"]):
        queue.push(MEDIUM, now=i, payload=i, tenant=tenant)
    assert [queue.pop(now=9).payload for _ in range(4)] == [0, 1, 2, 3]


def test_a_preempted_request_still_goes_first_and_priority_still_beats_fair_share():
    counters = TenantCounters(initial_estimate=10)
    queue = fair_queue(counters)
    counters.granted("heavy")
    queue.push(MEDIUM, now=0, payload="light", tenant="light")
    queue.push(MEDIUM, now=1, payload="heavy-preempted", tenant="heavy", front=True)
    queue.push(Priority.HIGH, now=2, payload="heavy-high", tenant="heavy")
    assert [queue.pop(now=3).payload for _ in range(3)] == ["heavy-high", "heavy-preempted", "light"]


def test_expiry_and_removal_work_across_tenants():
    queue = fair_queue(TenantCounters())
    a = queue.push(MEDIUM, now=0, payload="a", tenant="a")
    queue.push(MEDIUM, now=1, payload="b", tenant="b")
    queue.push(MEDIUM, now=50, payload="c", tenant="a")
    assert queue.remove(a) and not queue.remove(a)
    assert [w.payload for w in queue.pop_expired(now=61)] == ["b"]
    assert queue.depth(MEDIUM) == 1 and queue.pop(now=61).payload == "c"


async def test_admission_grants_freed_slots_by_fair_share():
    counters = TenantCounters(initial_estimate=10)
    replicas = ReplicaSet()
    replicas.add("r", "http://r", 1)
    admission = Scheduler(fair_queue(counters), replicas, shed=False)
    holder = await admission.acquire(MEDIUM, tenant="heavy")
    waiting = [asyncio.ensure_future(admission.acquire(MEDIUM, tenant=t)) for t in ["heavy", "heavy", "light"]]
    await asyncio.sleep(0)
    admission.release(holder, tokens=100)  # heavy was served 100 tokens: light goes next
    await asyncio.sleep(0)
    assert [w.done() for w in waiting] == [False, False, True]
    admission.release(waiting[2].result(), tokens=5)
    await asyncio.sleep(0)
    assert waiting[0].done() and not waiting[1].done()
    admission.release(waiting[0].result(), tokens=5)
    await asyncio.sleep(0)
    admission.release(waiting[1].result(), tokens=5)
    assert admission.in_flight == 0 and counters.counter("heavy") == 110
