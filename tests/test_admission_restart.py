"""Admission's death and restart, without Ray: the real AdmissionActor and AdmissionClient, with the transport
replaced by one that fails every call in flight when the actor "dies", as Ray's does, and puts a new, empty actor
in its place. What a Router runs is re-announced, what it had queued is queued again in order, new requests get
503 "recovering" meanwhile, and nothing is granted twice."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError

from serve_app.config import AdmissionConfig, QueueConfig
from serve_app.deployments.admission import AdmissionActor
from serve_app.deployments.admission_client import AdmissionClient, Held
from serve_app.errors import ErrorKind, GatewayError
from serve_app.policy.priority import Priority

URL = "http://127.0.0.1:9"


def _actor(restarted: bool = False) -> AdmissionActor:
    config = AdmissionConfig(adaptive_limit=False, shed_on_predicted_wait=False, preempt_window_s=None)
    actor = AdmissionActor(QueueConfig(), config, replica_check_s=3600)
    if restarted:  # what Ray's runtime context tells a restarted actor
        actor.restarted, actor._ever_ready = True, True
    return actor


class MortalActor:
    """Forwards calls to an AdmissionActor. `kill` fails every call in flight with ActorUnavailableError, as Ray
    does when the actor's process dies, and refuses calls until `restart` puts a new, empty actor in its place."""

    def __init__(self) -> None:
        self.actor = _actor()
        self.alive = True
        self._death: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def kill(self) -> None:
        self.alive = False
        self._death.set_result(None)
        self._death = asyncio.get_running_loop().create_future()

    def restart(self) -> AdmissionActor:
        self.actor = _actor(restarted=True)
        self.alive = True
        return self.actor

    def __getattr__(self, method: str) -> Any:
        async def call(*args: Any) -> Any:
            if not self.alive:
                raise ActorUnavailableError("the actor is restarting", None)
            work = asyncio.ensure_future(getattr(self.actor, method)(*args))
            death = asyncio.shield(self._death)
            done, _ = await asyncio.wait({work, death}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            work.cancel()
            raise ActorUnavailableError("the actor died", None)

        return call


class FakeRouter:
    """What a Router tells its AdmissionClient: the requests it runs."""

    def __init__(self, client: AdmissionClient) -> None:
        self.client = client
        self.running: dict[str, Held] = {}
        client.attach("router-1", lambda: list(self.running.values()))

    async def run(self, request_id: str, priority: Priority) -> str:
        grant = await self.client.acquire(request_id, priority, "router-1")
        self.running[request_id] = (request_id, int(priority), grant.url, None, None, False)
        return request_id

    def finish(self, request_id: str) -> None:
        del self.running[request_id]
        self.client.release(request_id, 10)


async def _until(check, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_a_restarted_admission_rebuilds_what_runs_and_queues_again_in_order():
    mortal = MortalActor()
    client = AdmissionClient.in_process(mortal)
    router = FakeRouter(client)
    await mortal.actor.register_replica("r1", URL, 2)
    await router.run("a", Priority.LOW)
    await router.run("b", Priority.LOW)
    queued = [asyncio.ensure_future(router.run(rid, Priority.LOW)) for rid in ("c", "d", "e")]
    await _until(lambda: len(mortal.actor.scheduler.queue) == 3)

    mortal.kill()
    await _until(lambda: client.recovering)
    with pytest.raises(GatewayError) as refused:  # a new request while Admission is away
        await router.run("f", Priority.HIGH)
    assert (refused.value.status, refused.value.kind, refused.value.retry_after_s) == (
        503,
        ErrorKind.ADMISSION_RECOVERING,
        2,
    )
    assert "recovering" in refused.value.message

    new = mortal.restart()
    await _until(lambda: not client.recovering)  # rejoined: a and b re-announced, unplaced until r1 is back
    assert len(new._unplaced) == 2
    await _until(lambda: len(new._waiting) == 3)  # c, d, e wait for the replicas, not refused
    await new.register_replica("r1", URL, 2)  # its next health check
    await _until(lambda: len(new.scheduler.queue) == 3)
    assert new.scheduler.in_flight == 2, "a and b hold their slots again: nothing else is granted"
    assert not any(task.done() for task in queued)

    router.finish("a")
    await _until(lambda: sum(t.done() for t in queued) == 1)
    router.finish("b")
    await _until(lambda: sum(t.done() for t in queued) == 2)
    assert [t.result() for t in queued if t.done()] == ["c", "d"], "queued again in the order they first came"
    router.finish("c")
    assert await queued[2] == "e"
    for rid in ("d", "e"):
        router.finish(rid)
    await _until(lambda: new.scheduler.in_flight == 0)
    state = await new.state()
    assert (state["rejoined_routers"], state["rejoined_running"], state["restarted"]) == (1, 2, True)
    assert sum(state[f"queued_{p.label}"] for p in Priority) == 0


async def test_a_request_asked_for_again_waits_once_and_holds_one_slot():
    """A call that failed without a restart (Admission could not be reached): the Router asks again under the
    same id. A grant whose answer was lost is given back, and a wait left behind is dropped, so that the request
    neither holds two slots nor waits twice; a rejoin re-announcing what already holds a slot changes nothing."""
    actor = _actor()
    await actor.register_replica("r1", URL, 2)
    await actor.acquire("kept", int(Priority.LOW), "router-1")
    await actor.acquire("lost", int(Priority.LOW), "router-1")  # its answer never reached the Router
    earlier = asyncio.ensure_future(actor.acquire("queued", int(Priority.LOW), "router-1"))
    await _until(lambda: len(actor.scheduler.queue) == 1)

    await actor.rejoin("router-1", [("kept", int(Priority.LOW), URL, None, None, False)])
    assert actor.scheduler.in_flight == 2, "a request already holding a slot is not counted twice"
    again = asyncio.ensure_future(actor.acquire("queued", int(Priority.LOW), "router-1"))
    with pytest.raises(asyncio.CancelledError):
        await earlier
    assert len(actor.scheduler.queue) == 1, "it waits once"
    # Asked again: the lost grant is given back first, and goes to the one waiting; "lost" waits behind it.
    lost = asyncio.ensure_future(actor.acquire("lost", int(Priority.LOW), "router-1"))
    assert (await again)["url"] == URL
    await _until(lambda: len(actor.scheduler.queue) == 1)
    assert actor.scheduler.in_flight == 2 and not lost.done()
    await actor.progress([], [("kept", 10, None)])
    assert (await lost)["url"] == URL
    await actor.progress([], [("lost", 10, None), ("queued", 10, None)])
    assert actor.scheduler.in_flight == 0 and not actor._waiting and not actor._waiting_owner


async def test_a_router_learns_of_a_restart_from_its_standing_call_even_with_no_call_in_flight():
    mortal = MortalActor()
    client = AdmissionClient.in_process(mortal)
    router = FakeRouter(client)
    await mortal.actor.register_replica("r1", URL, 4)
    await router.run("a", Priority.MEDIUM)
    known = mortal.actor.incarnation  # as of this Router's last standing call
    # The actor is replaced between two standing calls: no call of this Router fails.
    new = mortal.restart()
    await new.register_replica("r1", URL, 4)
    listening = asyncio.ensure_future(client.answer_preemptions("router-1", lambda asked: None))
    client._incarnation = known
    try:
        await _until(lambda: new.rejoined["routers"] == 1)
        assert new.scheduler.in_flight == 1 and "a" in new._slots
    finally:
        listening.cancel()


async def test_a_request_queued_when_admission_died_gets_503_if_it_never_comes_back(monkeypatch):
    from serve_app.deployments import admission_client

    monkeypatch.setattr(admission_client, "RECOVERY_WAIT_S", 0.2)
    mortal = MortalActor()
    client = AdmissionClient.in_process(mortal)
    router = FakeRouter(client)
    await mortal.actor.register_replica("r1", URL, 1)
    await router.run("a", Priority.LOW)
    waiting = asyncio.ensure_future(router.run("b", Priority.LOW))
    await _until(lambda: len(mortal.actor.scheduler.queue) == 1)
    mortal.kill()
    with pytest.raises(GatewayError) as refused:
        await waiting
    assert refused.value.kind == ErrorKind.ADMISSION_RECOVERING
    client._recovery.cancel()  # nothing comes back in this test
