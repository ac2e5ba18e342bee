"""The dispatch policy alone: order, aging, bounds, max wait, removal, Retry-After."""

import pytest

from serve_app.policy.priority import InvalidPriority, Priority, parse_priority, request_priority
from serve_app.policy.request_queue import ClassLimits, PriorityRequestQueue, QueueFull


def make_queue(max_len: int = 10, max_wait_s: float = 30.0, aging_s: float = 10.0) -> PriorityRequestQueue:
    return PriorityRequestQueue({p: ClassLimits(max_len, max_wait_s) for p in Priority}, aging_s=aging_s)


def test_pops_high_then_medium_then_low_fifo_within_class():
    q = make_queue()
    q.push(Priority.LOW, 0.0, "low-1")
    q.push(Priority.MEDIUM, 0.1, "med-1")
    q.push(Priority.LOW, 0.2, "low-2")
    q.push(Priority.HIGH, 0.3, "high-1")
    q.push(Priority.HIGH, 0.4, "high-2")
    order = [q.pop(0.5).payload for _ in range(5)]
    assert order == ["high-1", "high-2", "med-1", "low-1", "low-2"]
    assert q.pop(0.6) is None


def test_aging_lets_an_old_low_request_beat_a_fresh_high_one():
    q = make_queue(aging_s=10.0)
    q.push(Priority.LOW, 0.0, "old-low")
    q.push(Priority.HIGH, 20.5, "fresh-high")
    # The low one has waited 20.5 s = two classes and a bit: it now outranks a fresh high.
    assert q.pop(20.5).payload == "old-low"


def test_aging_does_not_promote_before_its_time():
    q = make_queue(aging_s=10.0)
    q.push(Priority.LOW, 0.0, "low")
    q.push(Priority.HIGH, 15.0, "high")
    assert q.pop(15.0).payload == "high"


def test_low_is_not_starved_by_a_steady_stream_of_high():
    q = make_queue(max_len=1000, aging_s=1.0)
    q.push(Priority.LOW, 0.0, "low")
    served = []
    now = 0.0
    for i in range(100):
        q.push(Priority.HIGH, now, f"high-{i}")
        served.append(q.pop(now).payload)
        now += 0.1
    assert "low" in served


def test_each_class_has_its_own_bound():
    q = PriorityRequestQueue(
        {Priority.HIGH: ClassLimits(1, 5), Priority.MEDIUM: ClassLimits(2, 5), Priority.LOW: ClassLimits(0, 5)},
        aging_s=10,
    )
    q.push(Priority.HIGH, 0, "h")
    with pytest.raises(QueueFull) as excinfo:
        q.push(Priority.HIGH, 0, "h2", retry_after_s=7)
    assert excinfo.value.retry_after_s == 7
    assert excinfo.value.priority is Priority.HIGH
    q.push(Priority.MEDIUM, 0, "m1")
    q.push(Priority.MEDIUM, 0, "m2")
    with pytest.raises(QueueFull):
        q.push(Priority.LOW, 0, "l")
    assert (q.depth(Priority.HIGH), q.depth(Priority.MEDIUM), q.depth(Priority.LOW)) == (1, 2, 0)


def test_pop_expired_takes_only_waiters_past_their_class_max_wait():
    q = PriorityRequestQueue(
        {Priority.HIGH: ClassLimits(5, 1.0), Priority.MEDIUM: ClassLimits(5, 5.0), Priority.LOW: ClassLimits(5, 2.0)},
        aging_s=100,
    )
    q.push(Priority.HIGH, 0.0, "h")
    q.push(Priority.MEDIUM, 0.0, "m")
    q.push(Priority.LOW, 0.0, "l-old")
    q.push(Priority.LOW, 1.5, "l-new")
    expired = {w.payload for w in q.pop_expired(2.0)}
    assert expired == {"h", "l-old"}
    assert len(q) == 2


def test_remove_takes_a_cancelled_waiter_out_once():
    q = make_queue()
    a = q.push(Priority.MEDIUM, 0, "a")
    q.push(Priority.MEDIUM, 0, "b")
    assert q.remove(a) is True
    assert q.remove(a) is False
    assert q.pop(1).payload == "b"


def test_a_preempted_request_goes_back_to_the_head_of_its_class_even_when_the_class_is_full():
    q = make_queue(max_len=1)
    q.push(Priority.LOW, 0.0, "waiting-low")
    with pytest.raises(QueueFull):
        q.push(Priority.LOW, 1.0, "new-low")
    q.push(Priority.LOW, 2.0, "preempted-low", front=True)
    q.push(Priority.HIGH, 3.0, "high")
    assert [q.pop(3.0).payload for _ in range(3)] == ["high", "preempted-low", "waiting-low"]


def test_effective_class_rises_one_class_per_aging_period():
    q = make_queue(aging_s=10.0)
    low = q.push(Priority.LOW, 0.0)
    assert q.effective_class(low, 0.0) is Priority.LOW
    assert q.effective_class(low, 9.9) is Priority.LOW
    assert q.effective_class(low, 10.0) is Priority.MEDIUM
    assert q.effective_class(low, 25.0) is Priority.HIGH
    assert q.effective_class(low, 1000.0) is Priority.HIGH
    assert q.peek(0.0) is low and len(q) == 1, "peek leaves the waiter in place"


def test_parse_priority_accepts_only_the_three_names():
    assert parse_priority(None) is Priority.MEDIUM
    assert parse_priority("HIGH") is Priority.HIGH
    assert parse_priority(" low ") is Priority.LOW
    for bad in ("urgent", "", 0, 1.5, ["high"]):
        with pytest.raises(InvalidPriority):
            parse_priority(bad)


def test_header_wins_over_body_field():
    assert request_priority("high", {"priority": "low"}) is Priority.HIGH
    assert request_priority(None, {"priority": "low"}) is Priority.LOW
    assert request_priority(None, {}) is Priority.MEDIUM
