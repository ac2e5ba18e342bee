"""Slots per LLM replica and the autoscaling arithmetic: pure logic, milliseconds."""

from __future__ import annotations

from serve_app.policy.autoscaling import desired_replicas
from serve_app.policy.replica_set import ReplicaSet


def test_capacity_is_the_sum_and_the_least_loaded_replica_is_picked():
    replicas = ReplicaSet()
    a = replicas.add("a", "http://a", 2)
    b = replicas.add("b", "http://b", 1)
    assert replicas.capacity == 3
    picks = [replicas.take().replica for _ in range(3)]
    assert picks[0] is a and picks.count(b) == 1 and picks.count(a) == 2
    assert replicas.take() is None, "every slot is taken"
    assert replicas.in_flight == 3


def test_a_removed_replica_takes_its_slots_with_it():
    replicas = ReplicaSet()
    a = replicas.add("a", "http://a", 1)
    held = replicas.take()
    assert held.replica is a
    replicas.remove("a")
    replicas.give_back(held)  # a release that arrives after the removal changes nothing
    assert replicas.capacity == 0 and replicas.in_flight == 0
    again = replicas.add("a", "http://a2", 1)  # re-registered after a restart: starts from zero
    assert again.in_flight == 0 and replicas.by_url("http://a2") is again and replicas.by_url("http://a") is None


def test_a_draining_replica_takes_nothing_new_and_gets_its_slots_back():
    replicas = ReplicaSet()
    a = replicas.add("a", "http://a", 2)
    b = replicas.add("b", "http://b", 2)
    held = replicas.take()
    assert held.replica is a
    replicas.drain("a")
    assert replicas.capacity == 2 and replicas.limit == 2 and replicas.serving == 1
    assert [replicas.take().replica, replicas.take().replica, replicas.take()] == [b, b, None], "nothing new goes to a"
    assert a.in_flight == 1, "what a runs is still counted"
    replicas.give_back(held)
    assert a.in_flight == 0 and replicas.in_flight == 2


def test_desired_replicas_counts_queued_work_and_stays_in_bounds():
    assert desired_replicas(ongoing=8, queued=0, target_per_replica=8, low=1, high=4) == 1
    assert desired_replicas(ongoing=8, queued=8, target_per_replica=8, low=1, high=4) == 2
    assert desired_replicas(ongoing=16, queued=100, target_per_replica=8, low=1, high=4) == 4
    assert desired_replicas(ongoing=0, queued=0, target_per_replica=8, low=1, high=4) == 1
