"""The QoS policies alone (reserved slots, shedding arithmetic, preemption choice): pure, milliseconds."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from serve_app.policy import shedding
from serve_app.policy.preemption import ASK_TTL_S, choose_victim, pending_asks, victim_for
from serve_app.policy.priority import Priority
from serve_app.policy.replica_set import ReplicaSet, Reservation
from serve_app.policy.reservation import Demand


def test_reservation_holds_back_slots_for_higher_classes_but_never_all():
    reserved = Reservation.for_classes(high=0.2, medium=0.1)
    assert reserved.allowed(20, Priority.HIGH) == 20
    assert reserved.allowed(20, Priority.MEDIUM) == 16
    assert reserved.allowed(20, Priority.LOW) == 14
    assert reserved.allowed(2, Priority.LOW) == 1, "every class keeps at least one slot"
    assert reserved.allowed(1, Priority.LOW) == 1
    with pytest.raises(ValueError):
        Reservation.for_classes(high=0.6, medium=0.4)


def test_low_cannot_take_the_reserved_slots_but_high_can():
    replicas = ReplicaSet(Reservation.for_classes(high=0.25))
    replicas.add("a", "http://a", 4)
    assert [replicas.take(Priority.LOW) is not None for _ in range(4)] == [True, True, True, False]
    assert replicas.can_take(Priority.HIGH) and not replicas.can_take(Priority.MEDIUM)
    assert replicas.take(Priority.HIGH) is not None
    assert replicas.take(Priority.HIGH) is None, "the limit itself binds every class"


def test_a_reserved_share_is_held_only_while_a_class_it_is_for_is_in_use():
    replicas = ReplicaSet(Reservation.for_classes(high=0.25, medium=0.25, hold_s=60))
    replicas.add("a", "http://a", 8)
    placed = [replicas.take(Priority.MEDIUM, now=0.0) for _ in range(8)]
    assert None not in placed, "no high has arrived: medium may fill every slot"
    for placement in placed:
        replicas.give_back(placement)
    replicas.arrived(Priority.MEDIUM, 10.0)
    assert replicas.room(replicas.get("a"), Priority.MEDIUM, now=10.0) == 8, "medium's own arrival holds nothing"
    assert replicas.room(replicas.get("a"), Priority.LOW, now=10.0) == 6, "medium arrived: low leaves it its share"
    replicas.arrived(Priority.HIGH, 20.0)
    assert replicas.room(replicas.get("a"), Priority.MEDIUM, now=20.0) == 6
    assert replicas.room(replicas.get("a"), Priority.LOW, now=20.0) == 4
    assert replicas.room(replicas.get("a"), Priority.MEDIUM, now=80.0) == 6, "held for hold_s after the arrival"
    assert replicas.room(replicas.get("a"), Priority.MEDIUM, now=80.1) == 8, "then open again"
    assert replicas.room(replicas.get("a"), Priority.LOW, now=80.1) == 8, "medium, too, last came 70 s ago"
    assert replicas.room(replicas.get("a"), Priority.LOW) == 4, "without a time: held, as with no hold_s"
    assert [replicas.next_release_of_shares(t) for t in (20.0, 75.0, 81.0)] == [70.0, 80.0, None]
    with pytest.raises(ValueError):
        Reservation.for_classes(high=0.1, hold_s=0)


def test_high_reserve_from_demand_follows_littles_law():
    demand = Demand(window_s=10.0)
    assert demand.reserve(now=0.0, replicas=1) == 1, "no demand measured yet: one slot while high is in use"
    for i in range(400):  # 4 high requests/s for 100 s, each holding its slot 2 s: L = 8
        demand.arrived(i * 0.25)
        demand.served(2.0)
    assert demand.concurrency(100.0) == pytest.approx(8.0, rel=0.15)
    assert 13 <= demand.reserve(now=100.0, replicas=1) <= 14, "L + 2 sqrt(L) = 13.7 for L = 8"
    assert demand.reserve(now=100.0, replicas=4) in (5, 6), "spread over four replicas: L = 2 each, plus 2*sqrt(2)"
    assert demand.reserve(now=200.0, replicas=1) <= 2, "high stopped coming: the reserve decays with its rate"


def test_the_demand_reserve_is_on_top_of_the_limit_and_sized_by_high_demand():
    replicas = ReplicaSet(Reservation.for_classes(high="auto", hold_s=60))
    a = replicas.add("a", "http://a", 256)
    assert replicas.room(a, Priority.HIGH, now=0.0) == 257, "no demand measured yet: one slot on top"
    for i in range(400):  # 2 high requests/s holding a slot 1 s each: L = 2
        replicas.arrived(Priority.HIGH, i * 0.5)
        replicas.high_demand.served(1.0)
    extra = replicas.room(a, Priority.HIGH, now=200.0) - 256
    assert 4 <= extra <= 7, f"L + 2 sqrt(L) for L near 2, not a fixed 10% (26 slots): {extra}"
    assert replicas.room(a, Priority.MEDIUM, now=200.0) == 256, "medium and low keep every slot the engine runs"
    assert replicas.room(a, Priority.LOW, now=200.0) == 256
    a.in_flight = 256
    assert replicas.room(a, Priority.LOW, now=200.0) == 0 and replicas.room(a, Priority.HIGH, now=200.0) == extra


def test_a_load_that_has_just_started_is_read_at_its_rate():
    """The decayed count of a load started t seconds ago is corrected for t: a 12 s run of 50 high/s is not
    read as 17/s (what a 30 s window without the correction gave on the H200)."""
    demand = Demand(window_s=10.0)
    for i in range(600):
        demand.arrived(i * 0.02)
    assert demand.rate(12.0) == pytest.approx(50.0, rel=0.05)
    one = Demand(window_s=10.0)
    one.arrived(0.0)
    assert one.rate(0.0) < 4.1, "one arrival is not a burst: read as at most 4/s (a quarter second's count)"
    burst = Demand(window_s=10.0)
    for i in range(10):  # 20/s for half a second
        burst.arrived(i * 0.05)
    assert burst.rate(0.5) == pytest.approx(20.0, rel=0.1), "a burst is read at its rate within half a second"
    for i in range(600):  # 12 s of 50/s again after 30 s idle: read anew, not diluted by the idle time
        demand.arrived(42.0 + i * 0.02)
    assert demand.rate(54.0) == pytest.approx(50.0, rel=0.05)


def test_predicted_wait_and_retry_after_come_from_the_drain_rate():
    rate = shedding.drain_rate(slots=8, mean_service_s=2.0)
    assert rate == 4.0
    assert shedding.predicted_wait_s(ahead=39, rate=rate) == 10.0
    assert shedding.predicted_wait_s(ahead=3, rate=0.0) == math.inf
    assert shedding.shed_retry_after_s(predicted_s=100.0, max_wait_s=30.0) == 70
    assert shedding.shed_retry_after_s(predicted_s=30.2, max_wait_s=30.0) == 1
    assert shedding.shed_retry_after_s(predicted_s=math.inf, max_wait_s=30.0) == 600
    assert shedding.queue_retry_after_s(ahead=0, rate=4.0, max_wait_s=30) == 1
    assert shedding.queue_retry_after_s(ahead=39, rate=4.0, max_wait_s=30) == 10
    assert shedding.queue_retry_after_s(ahead=1000, rate=1.0, max_wait_s=30) == 30


def test_the_drain_estimate_is_a_moving_mean_of_service_times():
    drain = shedding.DrainEstimate(initial_service_s=1.0)
    assert drain.mean_service_s == 1.0 and drain.samples == 0
    assert drain.rate(slots=4) == 4.0, "before any sample: the initial service time"
    drain.observe(6.0)
    assert drain.mean_service_s == pytest.approx(0.8 * 1.0 + 0.2 * 6.0)  # 2.0
    assert drain.rate(slots=4) == pytest.approx(2.0)
    drain.observe(2.0)
    assert drain.mean_service_s == pytest.approx(2.0), "a sample at the mean leaves it there"
    assert drain.samples == 2
    assert drain.rate(slots=0) == 0.0


def test_the_drain_estimate_is_trusted_only_after_enough_samples():
    drain = shedding.DrainEstimate(initial_service_s=0.001)  # would shed nearly everything if trusted
    for _ in range(shedding.SHED_AFTER_SAMPLES - 1):
        assert not drain.trusted
        assert drain.shed(ahead=1000, slots=1, max_wait_s=1.0) is None, "not trusted yet: never shed"
        drain.observe(100.0)
    assert not drain.trusted
    drain.observe(100.0)
    assert drain.trusted and drain.samples == shedding.SHED_AFTER_SAMPLES
    assert drain.shed(ahead=1000, slots=1, max_wait_s=1.0) is not None
    assert shedding.DrainEstimate(trusted_after=0).trusted


def test_the_drain_estimate_sheds_only_past_the_bound():
    drain = shedding.DrainEstimate(initial_service_s=2.0, trusted_after=0)  # 1 slot: 0.5 requests/s
    assert drain.shed(ahead=1, slots=1, max_wait_s=5.0) is None, "predicted 4 s"
    assert drain.shed(ahead=1, slots=1, max_wait_s=4.0) is None, "predicted 4 s: at the bound still queues"
    assert drain.shed(ahead=2, slots=1, max_wait_s=5.0) == (6.0, 1), "predicted 6 s: past the 5 s bound"
    assert drain.shed(ahead=39, slots=8, max_wait_s=30.0) is None, "8 slots drain 4 requests/s: 10 s"
    assert drain.shed(ahead=39, slots=8, max_wait_s=5.0) == (10.0, 5)
    assert drain.shed(ahead=0, slots=0, max_wait_s=5.0) == (math.inf, 600), "no slots: never drains"


@dataclass
class Grant:
    priority: Priority
    granted_at: float
    preempt_asked_at: float | None = None
    prefilling: bool = True


def test_the_victim_is_the_youngest_of_the_lowest_class_within_the_window():
    grants = [
        Grant(Priority.LOW, 9.0),
        Grant(Priority.LOW, 9.5),
        Grant(Priority.MEDIUM, 9.9),
        Grant(Priority.HIGH, 9.95),
        Grant(Priority.LOW, 1.0),  # granted long ago: surely past its first token
    ]
    assert choose_victim(grants, Priority.HIGH, now=10.0, window_s=2.0) is grants[1]
    grants[1].preempt_asked_at = 10.0
    assert choose_victim(grants, Priority.HIGH, now=10.0, window_s=2.0) is grants[0]
    grants[0].preempt_asked_at = 10.0
    assert choose_victim(grants, Priority.HIGH, now=10.0, window_s=2.0) is grants[2], "then medium"
    grants[2].preempt_asked_at = 10.0
    assert choose_victim(grants, Priority.HIGH, now=10.0, window_s=2.0) is None, "never a high, never an old one"
    assert choose_victim(grants, Priority.LOW, now=10.0, window_s=2.0) is None
    assert pending_asks(grants, now=10.0) == 3
    prefilled = Grant(Priority.LOW, 9.99, prefilling=False)  # its first token came back: its client saw it
    assert choose_victim([prefilled], Priority.HIGH, now=10.0, window_s=2.0) is None
    assert pending_asks(grants, now=10.0 + ASK_TTL_S) == 0, "unanswered asks count as refused"


def test_only_a_waiting_high_that_no_slot_or_ask_is_coming_to_preempts():
    young_low = Grant(Priority.LOW, 9.5)
    grants = [Grant(Priority.LOW, 1.0), young_low, Grant(Priority.HIGH, 9.9)]

    def victim(waiting: Priority = Priority.HIGH, placed: bool = False, high_waiting: int = 1) -> Grant | None:
        return victim_for(waiting, placed, high_waiting, grants, now=10.0, window_s=2.0)

    assert victim() is young_low
    assert victim(Priority.MEDIUM) is None, "only a high request preempts"
    assert victim(Priority.LOW) is None
    assert victim(placed=True) is None, "a replica has room for high: it gets a slot, not a victim"
    assert victim(high_waiting=0) is None, "no high waiting"
    young_low.preempt_asked_at = 9.8  # pending: a slot is on its way to the one high waiter
    assert victim(high_waiting=1) is None, "one ask per high waiter"
    assert victim(high_waiting=2) is None, "a second waiter, but no one left within the window to ask"
    grants.append(Grant(Priority.MEDIUM, 9.7))
    assert victim(high_waiting=2) is grants[-1], "a second waiter: a second ask"
    assert victim(high_waiting=1) is None, "still one ask per high waiter, with a candidate at hand"
    # An ask unanswered for ASK_TTL_S counts as refused: the waiter it was for needs another.
    assert victim_for(Priority.HIGH, False, 1, grants, now=9.8 + ASK_TTL_S + 0.1, window_s=10.0) is grants[-1]
