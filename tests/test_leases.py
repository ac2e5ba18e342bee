"""Router leases: pure policy, milliseconds."""

from __future__ import annotations

import pytest

from serve_app.policy.leases import Leases


def test_a_holder_that_stops_calling_in_expires_after_one_lease_and_only_once():
    leases = Leases(lease_s=15.0)
    leases.touch("a", 0.0)
    leases.touch("b", 0.0)
    assert leases.renew_s == 5.0
    for t in (5.0, 10.0, 15.0, 20.0):
        leases.touch("a", t)  # a renews; b has died
    assert leases.expired(14.9) == [], "b is within its lease still"
    assert leases.expired(15.1) == ["b"]
    assert leases.expired(30.0) == [], "told once: what b held is freed by the caller"
    assert "a" in leases and "b" not in leases and len(leases) == 1
    assert leases.expired(35.1) == ["a"], "a, too, once it stops"


def test_a_late_touch_never_moves_a_lease_back():
    leases = Leases(lease_s=10.0)
    leases.touch("a", 20.0)
    leases.touch("a", 5.0)  # a call that started earlier and returns late
    assert leases.expired(29.0) == []


def test_a_lease_must_be_positive():
    with pytest.raises(ValueError):
        Leases(0)


async def test_admission_frees_what_a_silent_router_held_and_serves_the_living():
    """A Router that dies never releases nor cancels: after its lease its slot goes to the next waiter and its
    queued request leaves the queue, while a Router that keeps its standing call keeps what it holds."""
    import asyncio

    from serve_app.config import AdmissionConfig, QueueConfig
    from serve_app.deployments.admission import AdmissionActor
    from serve_app.policy.priority import Priority

    config = AdmissionConfig(adaptive_limit=False, shed_on_predicted_wait=False, router_lease_s=0.3)
    actor = AdmissionActor(QueueConfig(), config, replica_check_s=3600)
    await actor.register_replica("r", "http://127.0.0.1:9", 2)

    async def calls_in(router_id: str) -> None:
        while True:
            await actor.preemptions(router_id)

    living = asyncio.ensure_future(calls_in("living"))
    try:
        held = await actor.acquire("l1", int(Priority.LOW), "living")
        await actor.acquire("g1", int(Priority.MEDIUM), "ghost")  # the ghost's only call: it dies now
        queued_ghost = asyncio.ensure_future(actor.acquire("g2", int(Priority.MEDIUM), "ghost"))
        queued_living = asyncio.ensure_future(actor.acquire("l2", int(Priority.LOW), "living"))
        await asyncio.sleep(0.05)
        state = await actor.state()
        assert (state["in_flight"], state["queued_medium"], state["queued_low"]) == (2, 1, 1)
        granted = await asyncio.wait_for(queued_living, 5)  # the ghost's slot, once its lease ran out
        assert granted["url"] == held["url"]
        assert queued_ghost.cancelled() or isinstance(queued_ghost.exception(), asyncio.CancelledError)
        state = await actor.state()
        assert (state["reclaimed_routers"], state["reclaimed_slots"], state["reclaimed_queued"]) == (1, 1, 1)
        assert (state["in_flight"], state["queued_medium"], state["routers_leased"]) == (2, 0, 1)
        await actor.progress([], [("l1", 3, 5), ("l2", 3, 5)])
        assert (await actor.state())["in_flight"] == 0, "the living Router's releases still count"
    finally:
        living.cancel()
        for task in (living, actor._sweeper, actor._checker):
            if task is not None:
                task.cancel()
        await asyncio.gather(living, return_exceptions=True)
