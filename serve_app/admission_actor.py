"""The priority queues and dispatch slots that every Router shares, in one actor.

Each request costs one `acquire` call, which returns the replica to send it to, and a share of
one `release_many` call; no token passes through here. One place for the queues keeps priority
order exact across any number of Routers: a freed slot goes to the best waiter of the gateway.

The slot keeper is a plain Ray actor, owned by the one-replica Admission deployment that ties it
to the application's life. Callers reach it directly (`AdmissionClient`): a plain actor call
measured 2.4x cheaper than the same call through a Serve handle (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve_app.admission import Admission, NotReady, QueueFull, QueueTimeout, Slot
from serve_app.config import NO_ACCESS_LOG, SINGLE_LOOP_ENV, QueueConfig
from serve_app.errors import GatewayError
from serve_app.priority import Priority
from serve_app.replica_set import ReplicaSet
from serve_app.request_queue import PriorityRequestQueue

logger = logging.getLogger("ray.serve")

NOT_READY_RETRY_S = 5


class AdmissionActor:
    def __init__(self, queue: QueueConfig, replica_check_s: float = 2.0) -> None:
        self.admission = Admission(PriorityRequestQueue(queue.limits(), queue.aging_s), ReplicaSet())
        self._slots: dict[str, Slot] = {}  # granted, by request id
        self._waiting: dict[str, asyncio.Task[Slot]] = {}
        self._released_early: set[str] = set()  # released while its acquire was still in flight
        self._ever_ready = False
        self._replica_check_s = replica_check_s
        self._checker: asyncio.Task[None] | None = None

    # ---- per request ---------------------------------------------------------------------------

    async def acquire(self, request_id: str, priority: int) -> dict[str, Any]:
        """Waits for a slot; returns the replica's URL and the wait. Raises GatewayError (429/503)."""
        prio = Priority(priority)
        task = asyncio.ensure_future(self.admission.acquire(prio))
        self._waiting[request_id] = task
        try:
            slot = await task
        except asyncio.CancelledError:
            self._released_early.discard(request_id)
            raise
        except QueueFull as exc:
            raise GatewayError(429, f"{exc}; retry later", retry_after_s=exc.retry_after_s, kind="queue_full") from None
        except QueueTimeout as exc:
            raise GatewayError(
                429, f"{exc}; retry later", retry_after_s=exc.retry_after_s, kind="queue_timeout"
            ) from None
        except NotReady as exc:
            raise GatewayError(
                503, self._not_ready_message(exc), retry_after_s=NOT_READY_RETRY_S, kind="not_ready"
            ) from None
        finally:
            self._waiting.pop(request_id, None)
        if request_id in self._released_early:  # the Router gave up while the grant was on its way
            self._released_early.discard(request_id)
            self.admission.release(slot)
            raise GatewayError(499, "the client left while queued", kind="client_gone")
        self._slots[request_id] = slot
        return {"url": slot.replica.url, "queue_wait_s": slot.queue_wait_s}

    async def release_many(self, request_ids: list[str]) -> None:
        """Idempotent. A Router also releases a request whose client left while queued, which covers the
        race where the grant and the cancellation cross."""
        for request_id in request_ids:
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                self.admission.release(slot)
                continue
            task = self._waiting.get(request_id)
            if task is not None:
                self._released_early.add(request_id)
                task.cancel()

    # ---- replicas ------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        self.admission.replicas.add(replica_id, url, max_ongoing)
        self._ever_ready = True
        logger.info("replica %s at %s joined with %d slots", replica_id, url, max_ongoing)
        self.admission.replicas_changed()
        if self._checker is None:
            self._checker = asyncio.ensure_future(self._check_replicas())

    async def ensure_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        """Registers a healthy replica that the keeper does not know: after the keeper restarted, or after
        a check dropped it for a passing fault. A known replica keeps its slot counts."""
        if self.admission.replicas.get(replica_id) is None:
            await self.register_replica(replica_id, url, max_ongoing)

    async def deregister_replica(self, replica_id: str) -> None:
        if self.admission.replicas.remove(replica_id) is not None:
            logger.info("replica %s left", replica_id)

    async def report_failure(self, url: str) -> None:
        """A Router could not reach this replica: stop dispatching there until it registers again."""
        replica = self.admission.replicas.by_url(url)
        if replica is not None:
            logger.warning("replica %s at %s failed; no more requests go there", replica.replica_id, url)
            self.admission.replicas.remove(replica.replica_id)

    async def _check_replicas(self) -> None:
        """Drops replicas that stop answering, so capacity and /health tell the truth without traffic."""
        timeout = aiohttp.ClientTimeout(total=max(self._replica_check_s * 2, 5))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self._replica_check_s)
                for replica in self.admission.replicas:
                    try:
                        async with session.get(f"{replica.url}/health") as response:
                            ok = response.status == 200
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        ok = False
                    if not ok and replica.live:
                        await self.report_failure(replica.url)

    # ---- state ---------------------------------------------------------------------------------

    async def replica_load(self, replica_id: str) -> dict[str, int]:
        """For the autoscaler: requests on this replica, and everything waiting at the gateway."""
        replica = self.admission.replicas.get(replica_id)
        return {"in_flight": replica.in_flight if replica else 0, "queued": len(self.admission.queue)}

    async def state(self) -> dict[str, Any]:
        queue = self.admission.queue
        return {
            **{f"queued_{p.label}": queue.depth(p) for p in Priority},
            "in_flight": self.admission.in_use,
            "capacity": self.admission.capacity,
            "replicas": len(self.admission.replicas),
        }

    def _not_ready_message(self, exc: NotReady) -> str:
        if self._ever_ready:
            return "no model replica is serving right now: recovering after a replica failure or restart"
        return "the model is still loading"


class AdmissionOwner:
    """The Admission deployment: creates the slot keeper, hands out its actor handle, and fails its health
    check when the keeper is gone, so Ray Serve restarts both."""

    def __init__(self, queue: QueueConfig, replica_check_s: float = 2.0) -> None:
        keeper = ray.remote(num_cpus=0, max_concurrency=1_000_000)(AdmissionActor)
        self.keeper = keeper.remote(queue, replica_check_s)

    async def keeper_handle(self) -> Any:
        return self.keeper

    async def check_health(self) -> None:
        await self.keeper.state.remote()


class AdmissionClient:
    """What Routers and LLMServers hold: direct calls to the slot keeper, found again after a restart,
    and releases sent in batches: one call in flight at a time carries every release made meanwhile."""

    def __init__(self, owner: DeploymentHandle) -> None:
        self._owner = owner
        self._keeper: Any = None
        self._releases: list[str] = []
        self._releasing = False

    async def call(self, method: str, *args: Any) -> Any:
        for attempt in (1, 2):
            if self._keeper is None:
                self._keeper = await self._owner.keeper_handle.remote()
            try:
                return await getattr(self._keeper, method).remote(*args)
            except RayActorError:
                self._keeper = None  # restarted with the Admission replica: ask its owner again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def release(self, request_id: str) -> None:
        self._releases.append(request_id)
        if not self._releasing:
            self._releasing = True
            asyncio.ensure_future(self._send_releases())

    async def _send_releases(self) -> None:
        try:
            while self._releases:
                batch, self._releases = self._releases, []
                try:
                    await self.call("release_many", batch)
                except Exception:  # a new keeper has no slots to free; nothing is lost by dropping these
                    logger.exception("releasing %d slots failed", len(batch))
        finally:
            self._releasing = False


AdmissionDeployment = serve.deployment(
    AdmissionOwner,
    name="Admission",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    health_check_period_s=5,
    logging_config=NO_ACCESS_LOG,
)
