"""The priority queues and dispatch slots that every Router shares, in one actor.

Each request costs one `acquire` call, which returns the replica to send it to, and a share of
the batched `progress` calls that report first tokens and releases; no token passes through here. One place for the queues keeps priority
order exact across any number of Routers: a freed slot goes to the best waiter of the gateway.

The queues live in `AdmissionActor`, a plain Ray actor owned by `AdmissionReplica`, the one replica of
the Admission deployment, which ties the actor to the application's life. Callers reach it directly (`AdmissionClient`): a plain actor call
measured 2.4x cheaper than the same call through a Serve handle (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import ray
from ray import serve
from ray.exceptions import RayActorError

from serve_app.config import NO_ACCESS_LOG, ON_HEAD_NODE, SINGLE_LOOP_ENV, AdmissionConfig, QueueConfig
from serve_app.deployments import process_priority
from serve_app.deployments.admission_client import Held, Shape
from serve_app.deployments.health import answers_health
from serve_app.deployments.scheduler import Scheduler, Slot
from serve_app.engine import engine_metrics
from serve_app.engine.engine_metrics import EngineFigures
from serve_app.errors import ErrorKind, GatewayError, refusal_error
from serve_app.policy.api_keys import RateLimits
from serve_app.policy.fairness import TenantCounters
from serve_app.policy.leases import Leases
from serve_app.policy.prefix_index import PrefixIndex
from serve_app.policy.priority import Priority
from serve_app.policy.refusals import NotReady, Refused
from serve_app.policy.replica_set import Replica, ReplicaSet, Reservation, Routing
from serve_app.policy.request_queue import PriorityRequestQueue
from serve_app.policy.token_load import PrefillBudget, PromptShape

logger = logging.getLogger("ray.serve")

# After a restart, how long a request waits for the replicas to register again (each does at its health check,
# every 2 s) before it gets 503 "recovering".
RECOVERY_GRACE_S = 10.0
# How long the Admission replica's health check waits for Ray to restart its actor in place before it fails (and
# Ray Serve replaces replica and actor, losing what the restarted actor would have rebuilt).
ACTOR_RESTART_GRACE_S = 25.0


def build_scheduler(queue: QueueConfig, config: AdmissionConfig) -> Scheduler:
    """The policies that the config names, put together."""
    budget = PrefillBudget(config.prefill_budget_s, config.min_prefill_budget_tokens) if config.adaptive_limit else None
    replicas = ReplicaSet(
        Reservation.for_classes(config.reserved.high, config.reserved.medium, config.reserved.hold_s),
        budget,
        Routing(config.routing),
        PrefixIndex(config.prefix_index_entries),
    )
    return Scheduler(
        PriorityRequestQueue(queue.limits(), queue.aging_s, TenantCounters() if config.fair_share else None),
        replicas,
        shed=config.shed_on_predicted_wait,
        preempt_window_s=config.preempt_window_s,
    )


class AdmissionActor:
    def __init__(
        self,
        queue: QueueConfig,
        config: AdmissionConfig | None = None,
        replica_check_s: float = 2.0,
        rate_limits: dict[str, tuple[float | None, float | None]] | None = None,
    ) -> None:
        process_priority.restore_for_process("Admission")
        self.scheduler = build_scheduler(queue, config or AdmissionConfig())
        self.rates = RateLimits(rate_limits or {})
        self._tenants: dict[str, str] = {}  # API key name, by request id, to charge its output tokens
        self.scheduler.on_preempt = self._ask_to_preempt
        self._mailboxes: dict[str, list[str]] = {}  # preemption asks, by router id
        self._mail = asyncio.Event()
        self._slots: dict[str, Slot] = {}  # granted, by request id
        self._prompt_chars: dict[str, int] = {}  # of granted requests: with the prompt tokens, chars per token
        self._engines: dict[str, EngineFigures] = {}  # vLLM's own figures, by replica id, from the replica check
        self._waiting: dict[str, asyncio.Task[Slot]] = {}
        self._released_early: set[str] = set()  # released while its acquire was still in flight
        self._ever_ready = False
        self._replica_check_s = replica_check_s
        self._checker: asyncio.Task[None] | None = None
        self.leases = Leases((config or AdmissionConfig()).router_lease_s)
        self._waiting_owner: dict[str, str] = {}  # router id, by request id, of the requests still queued
        self._sweeper: asyncio.Task[None] | None = None
        self.reclaimed = {"routers": 0, "slots": 0, "queued": 0}  # from Routers whose lease ran out
        # Requests a Router runs on a replica not registered (yet) since this actor restarted, by request id.
        self._unplaced: dict[str, tuple[str, Held]] = {}
        self.restarted = _restarted_by_ray()
        self.incarnation = uuid.uuid4().hex  # new with each start: how a Router learns of a restart
        self.rejoined = {"routers": 0, "running": 0}  # what Routers re-announced after a restart
        self._replicas_back = asyncio.Event()  # after a restart: set once a replica registered again
        self._started_at = time.monotonic()
        if self.restarted:
            self._ever_ready = True  # its replicas served before: until they register again, "recovering"
            logger.warning("Admission restarted: rebuilding its state as replicas and Routers report in")

    # ---- per request ---------------------------------------------------------------------------

    async def acquire(
        self,
        request_id: str,
        priority: int,
        router_id: str | None = None,
        front: bool = False,
        tenant: str | None = None,
        shape: Shape | None = None,
    ) -> dict[str, Any]:
        """Waits for a slot; returns the replica's URL and the wait (`Grant`'s fields). Raises GatewayError (429/503).
        `router_id` makes the request preemptible: asks reach that Router through `preemptions`.
        `tenant`: the API key's name, whose rate limits apply (here, so that they hold across Routers).
        `shape`: the prompt's (characters, prefix block hashes, max_tokens), for placing it by cache and load."""
        prio = Priority(priority)
        if tenant is not None and not front:
            wait_s = self.rates.admit(tenant, time.monotonic())
            if wait_s > 0:
                raise GatewayError(
                    429,
                    f"the rate limit of API key '{tenant}' is reached; retry later",
                    retry_after_s=max(1, math.ceil(wait_s)),
                    kind=ErrorKind.RATE_LIMITED,
                )
        prompt = PromptShape(*shape) if shape is not None else None
        self._asked_again(request_id)
        if router_id is not None:
            self._renew(router_id)
            self._waiting_owner[request_id] = router_id
        task = asyncio.ensure_future(self._slot(prio, front, tenant or "", prompt))
        self._waiting[request_id] = task
        try:
            slot = await task
        except asyncio.CancelledError:
            if self._waiting.get(request_id) is task:
                self._released_early.discard(request_id)
            raise
        except NotReady as exc:
            raise refusal_error(exc, self._not_ready_message()) from None
        except Refused as exc:
            raise refusal_error(exc) from None
        finally:
            if self._waiting.get(request_id) is task:  # not replaced by the same request asking again
                del self._waiting[request_id]
                self._waiting_owner.pop(request_id, None)
        if request_id in self._released_early:  # the Router gave up while the grant was on its way
            self._released_early.discard(request_id)
            self.scheduler.release(slot)
            raise GatewayError(499, "the client left while queued", kind=ErrorKind.CLIENT_GONE_WHILE_QUEUED)
        if router_id is not None:
            slot.owner = (router_id, request_id)
        if tenant is not None:
            self._tenants[request_id] = tenant
        self._slots[request_id] = slot
        if prompt is not None:
            self._prompt_chars[request_id] = prompt.chars
        return {"url": slot.replica.url, "queue_wait_s": slot.queue_wait_s}  # a Grant's fields

    def _asked_again(self, request_id: str) -> None:
        """A Router asks again for a request it asked for before, when that call failed (Admission could not
        be reached, or restarted): whatever that call left here, a wait or a grant whose answer was lost, is
        dropped, so that the request waits once and holds one slot."""
        if (earlier := self._waiting.pop(request_id, None)) is not None:
            self._waiting_owner.pop(request_id, None)
            earlier.cancel()
        if (slot := self._slots.pop(request_id, None)) is not None:
            self._forget(request_id)
            self.scheduler.release(slot)

    async def _slot(self, priority: Priority, front: bool, tenant: str, prompt: PromptShape | None) -> Slot:
        """Just restarted, with no replica registered again yet, a request first waits for them (in arrival
        order) rather than get 503 for a state that is being rebuilt, for up to RECOVERY_GRACE_S."""
        left = self._started_at + RECOVERY_GRACE_S - time.monotonic()
        if self.restarted and not self._replicas_back.is_set() and left > 0:
            try:
                await asyncio.wait_for(self._replicas_back.wait(), left)
            except asyncio.TimeoutError:
                pass
        return await self.scheduler.acquire(priority, front=front, tenant=tenant, shape=prompt)

    async def progress(
        self, first_tokens: list[tuple[str, float]], releases: list[tuple[str, int | None, int | None]]
    ) -> None:
        """What the Routers saw since their last call. `first_tokens`: (request id, seconds from its grant to its
        first token): its prefill is done. `releases`: (request id, its output tokens, its prompt tokens, each
        None when unknown). Idempotent. A Router also releases a request whose client left while queued, which
        covers the race where the grant and the cancellation cross."""
        for request_id, seconds in first_tokens:
            slot = self._slots.get(request_id)
            if slot is not None:
                self.scheduler.first_token(slot, seconds)
        estimates = self.scheduler.replicas.estimates
        for request_id, tokens, prompt_tokens in releases:
            estimates.learn(self._prompt_chars.pop(request_id, None), prompt_tokens, tokens)
            tenant = self._tenants.pop(request_id, None)
            if tenant is not None:
                self.rates.charge_tokens(tenant, tokens or 0, time.monotonic())
            slot = self._slots.pop(request_id, None)
            if slot is not None:
                self.scheduler.release(slot, tokens)
                continue
            if self._unplaced.pop(request_id, None) is not None:
                continue
            task = self._waiting.get(request_id)
            if task is not None:
                self._released_early.add(request_id)
                task.cancel()

    async def preemptions(self, router_id: str, known: str | None = None) -> tuple[str, list[str]]:
        """A Router's standing call: returns this actor's incarnation and the ids of the Router's requests that
        should give up their slots, when there are any, and otherwise an empty list every `leases.renew_s`, so
        that each call renews the Router's lease (`policy/leases.py`). The Router preempts those that have not
        sent a byte, and releases them. A new incarnation tells it that Admission restarted: at once when
        the incarnation it `known` is not this one."""
        self._renew(router_id)
        if known is not None and known != self.incarnation:
            return self.incarnation, []
        deadline = time.monotonic() + self.leases.renew_s
        while True:
            asked = self._mailboxes.pop(router_id, None)
            if asked:
                return self.incarnation, asked
            left = deadline - time.monotonic()
            if left <= 0:
                return self.incarnation, []
            self._mail.clear()
            try:
                await asyncio.wait_for(self._mail.wait(), left)
            except asyncio.TimeoutError:
                return self.incarnation, []

    async def rejoin(self, router_id: str, running: list[Held]) -> dict[str, int]:
        """A Router that lost calls to this actor (it restarted, or could not be reached) tells what it runs:
        each request it lists holds a slot on its replica, counted as soon as the replica is known (a
        restarted actor learns its replicas from their health checks). Then it queues again what it had
        queued, under the same ids (`_asked_again`), in their first order."""
        self._renew(router_id)
        adopted = 0
        for held in running:
            request_id, _, url, *_ = held
            if request_id in self._slots:
                continue
            replica = self.scheduler.replicas.by_url(url)
            if replica is None:
                self._unplaced[request_id] = (router_id, held)
            else:
                self._adopt(router_id, replica, held)
                adopted += 1
        self.rejoined["routers"] += 1
        self.rejoined["running"] += len(running)
        logger.info("Router %s rejoined with %d running requests (%d placed now)", router_id, len(running), adopted)
        return {"running": len(running), "placed": adopted}

    def _adopt(self, router_id: str, replica: Replica, held: Held) -> None:
        request_id, priority, _, tenant, shape, prefilling = held
        prompt = PromptShape(*shape) if shape is not None else PromptShape()
        slot = self.scheduler.adopt(replica, Priority(priority), prompt, tenant or "", prefilling)
        slot.owner = (router_id, request_id)
        self._slots[request_id] = slot
        if tenant is not None:
            self._tenants[request_id] = tenant

    def _forget(self, request_id: str) -> None:
        self._tenants.pop(request_id, None)
        self._prompt_chars.pop(request_id, None)

    def _renew(self, router_id: str) -> None:
        self.leases.touch(router_id, time.monotonic())
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_leases())

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.leases.renew_s)
            for router_id in self.leases.expired(time.monotonic()):
                self._reclaim(router_id)

    def _reclaim(self, router_id: str) -> None:
        """A Router not heard from for a lease is dead: its slots go back, its queued requests leave the queue."""
        slots = [rid for rid, slot in self._slots.items() if slot.owner is not None and slot.owner[0] == router_id]
        for request_id in slots:
            self._forget(request_id)
            self.scheduler.release(self._slots.pop(request_id))
        for request_id in [rid for rid, (owner, _) in self._unplaced.items() if owner == router_id]:
            del self._unplaced[request_id]
        queued = [rid for rid, owner in self._waiting_owner.items() if owner == router_id]
        for request_id in queued:
            task = self._waiting.get(request_id)
            if task is not None:
                task.cancel()
        self._mailboxes.pop(router_id, None)
        self.reclaimed["routers"] += 1
        self.reclaimed["slots"] += len(slots)
        self.reclaimed["queued"] += len(queued)
        logger.warning(
            "Router %s not heard from for %.0f s: taken for dead; %d slots freed, %d queued requests dropped",
            router_id,
            self.leases.lease_s,
            len(slots),
            len(queued),
        )

    def _ask_to_preempt(self, slot: Slot) -> None:
        if slot.owner is None:
            return
        router_id, request_id = slot.owner
        self._mailboxes.setdefault(router_id, []).append(request_id)
        self._mail.set()

    # ---- replicas ------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        replica = self.scheduler.replicas.add(replica_id, url, max_ongoing)
        self._ever_ready = True
        self._replicas_back.set()
        for request_id, (router_id, held) in list(self._unplaced.items()):
            if held[2] == url:  # re-announced by its Router before the replica registered again
                del self._unplaced[request_id]
                self._adopt(router_id, replica, held)
        logger.info(
            "replica %s at %s joined with %d slots (%d in use)", replica_id, url, max_ongoing, replica.in_flight
        )
        self.scheduler.replicas_changed()
        if self._checker is None:
            self._checker = asyncio.ensure_future(self._check_replicas())

    async def ensure_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        """Registers a healthy replica that the actor does not know: after the actor restarted, or after
        a check dropped it for a passing fault. A known replica keeps its slot counts."""
        if self.scheduler.replicas.get(replica_id) is None:
            await self.register_replica(replica_id, url, max_ongoing)

    async def drain_replica(self, replica_id: str) -> int:
        """The replica is stopping: no new request goes there. Returns how many it still runs; it leaves
        (`deregister_replica`) once they are done, so their releases still count. Idempotent."""
        replica = self.scheduler.replicas.get(replica_id)
        if replica is None:
            return 0
        if not replica.draining:  # the replica asks again while it waits: only the first ask changes anything
            self.scheduler.replicas.drain(replica_id)
            logger.info("replica %s drains %d requests", replica_id, replica.in_flight)
            self.scheduler.replicas_changed()
        return replica.in_flight

    async def deregister_replica(self, replica_id: str) -> None:
        if self.scheduler.replicas.remove(replica_id) is not None:
            logger.info("replica %s left", replica_id)
            self.scheduler.replicas_changed()

    async def report_failure(self, url: str) -> None:
        """A Router could not reach this replica, or saw its engine fail: if it also fails a health check,
        stop dispatching there until it registers again. One refused or reset connection under load is not
        enough: on an H200 at 80 requests/s that took the only replica out for 5 s and failed its queue."""
        replica = self.scheduler.replicas.by_url(url)
        if replica is None or await self._answers_health(url):
            return
        self._remove_failed(replica)

    def _remove_failed(self, replica: Replica) -> None:
        if self.scheduler.replicas.remove(replica.replica_id) is None:
            return
        logger.warning("replica %s at %s failed; no more requests go there", replica.replica_id, replica.url)
        self.scheduler.replicas_changed()

    async def _answers_health(self, url: str) -> bool:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return await answers_health(session, url)

    async def _check_replicas(self) -> None:
        """Drops replicas that stop answering, so capacity and /health tell the truth without traffic."""
        timeout = aiohttp.ClientTimeout(total=max(self._replica_check_s * 2, 5))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await asyncio.sleep(self._replica_check_s)
                for replica in self.scheduler.replicas:
                    if not await answers_health(session, replica.url):
                        if replica.live:
                            self._remove_failed(replica)
                        continue
                    figures = await engine_metrics.read(session, replica.url)
                    if figures is not None:
                        self._engines[replica.replica_id] = figures
                known = {r.replica_id for r in self.scheduler.replicas}
                for gone in set(self._engines) - known:
                    del self._engines[gone]

    # ---- state ---------------------------------------------------------------------------------

    async def replica_load(self, replica_id: str) -> dict[str, int]:
        """For the autoscaler: requests on this replica, and everything waiting at the gateway."""
        replica = self.scheduler.replicas.get(replica_id)
        return {"in_flight": replica.in_flight if replica else 0, "queued": len(self.scheduler.queue)}

    async def set_routing(self, routing: str) -> str:
        """Switches how replicas are picked, live (an operator's A/B, `PUT /v1/admin/routing`); returns the old one."""
        replicas = self.scheduler.replicas
        old, replicas.routing = replicas.routing, Routing(routing)
        logger.info("routing changed from %s to %s", old.value, replicas.routing.value)
        return old.value

    async def state(self) -> dict[str, Any]:
        scheduler = self.scheduler
        queue = scheduler.queue
        replicas = scheduler.replicas
        estimates = replicas.estimates
        return {
            **{f"queued_{p.label}": queue.depth(p) for p in Priority},
            "in_flight": scheduler.in_flight,
            "concurrency_limit": scheduler.replicas.limit,
            "capacity": scheduler.capacity,
            "replicas": scheduler.replicas.serving,
            "replicas_draining": len(scheduler.replicas) - scheduler.replicas.serving,
            "drain_rate_per_s": round(scheduler.drain_rate(), 3),
            "routing": replicas.routing.value,
            "pending_prefill_tokens": sum(r.load.pending_prefill for r in replicas),
            "high_reserve_slots": replicas.high_reserve(time.monotonic())
            if replicas.reservation.high_from_demand
            else None,
            "chars_per_token": round(estimates.chars_per_token, 3),
            "mean_output_tokens": round(estimates.mean_output_tokens, 1),
            "prefix_index_entries": len(replicas.index),
            **{f"preempt_asks_{p.label}": scheduler.preempt_asks[p] for p in Priority},
            **{f"shed_at_arrival_{p.label}": scheduler.shed_count[p] for p in Priority},
            "routers_leased": len(self.leases),
            **{f"reclaimed_{what}": count for what, count in self.reclaimed.items()},
            "restarted": self.restarted,
            "incarnation": self.incarnation,
            **{f"rejoined_{what}": count for what, count in self.rejoined.items()},
            "unplaced_running": len(self._unplaced),
            "replica_detail": [
                {
                    "replica": urlsplit(r.url).netloc,  # the engine's host:port, as Prometheus names its target
                    "in_flight": r.in_flight,
                    "limit": r.limit,
                    "dispatched": r.dispatched,
                    "draining": r.draining,
                    "pending_prefill_tokens": r.load.pending_prefill,
                    "kv_tokens": r.load.kv_tokens,
                    "prefill_tokens_per_s": round(r.prefill_rate.tokens_per_s or 0.0, 1),
                    "prefill_budget_tokens": self._budget_tokens(r),
                    "expected_cached_share": round(r.cached_tokens / r.prompt_tokens, 4) if r.prompt_tokens else 0.0,
                    **self._engine_detail(r),
                }
                for r in replicas
            ],
        }

    def _engine_detail(self, replica: Replica) -> dict[str, float | None]:
        """vLLM's own figures for the replica, as of the last replica check (None until one was read)."""
        figures = self._engines.get(replica.replica_id, EngineFigures())
        return {f"engine_{key}": value for key, value in figures.as_dict().items()}

    def _budget_tokens(self, replica: Replica) -> float | None:
        """The pending prefill medium and low may leave on the replica now; None while unbounded."""
        tokens = self.scheduler.replicas.budget_tokens(replica)
        return None if math.isinf(tokens) else round(tokens)

    def _not_ready_message(self) -> str:
        if len(self.scheduler.replicas):  # some are left, all of them draining
            return "the model replicas are shutting down"
        if self.restarted and self._ever_ready:
            return "the gateway is recovering: its admission service restarted and its model replicas are reporting in"
        if self._ever_ready:
            return "no model replica is serving right now: recovering after a replica failure or restart"
        return "the model is still loading"


def _restarted_by_ray() -> bool:
    """Whether this actor is a restart of one that died (False outside Ray: tests that build it in-process)."""
    try:
        return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


class AdmissionReplica:
    """The Admission deployment's replica: creates the actor, hands out its handle, and fails its health
    check when the actor is gone, so Ray Serve restarts both."""

    def __init__(self, drain_timeout_s: float, *actor_args: Any) -> None:
        """`actor_args` are AdmissionActor's, passed through unchanged."""
        # Ray restarts the actor in place if its process dies (same handle); it then rebuilds its state from
        # the replicas' health checks and the Routers' `rejoin`. A call in flight then fails, never retried.
        actor = ray.remote(
            num_cpus=0, resources=ON_HEAD_NODE, max_concurrency=1_000_000, max_restarts=-1, max_task_retries=0
        )(AdmissionActor)
        self.actor = actor.remote(*actor_args)
        self.drain_timeout_s = drain_timeout_s

    async def __del__(self) -> None:
        """On shutdown the actor (owned here) goes with this replica: first let the requests that hold
        slots finish, so that the Routers' releases still land while the LLM replicas drain."""
        deadline = time.monotonic() + self.drain_timeout_s
        try:
            while (await self.actor.state.remote())["in_flight"] and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        except RayActorError:
            pass

    async def actor_handle(self) -> Any:
        return self.actor

    async def check_health(self) -> None:
        """Passes while Ray restarts the actor in place (a call fails at its death, then waits for the new
        process): three failed checks would make Ray Serve replace the replica, and the actor with it."""
        deadline = time.monotonic() + ACTOR_RESTART_GRACE_S
        while True:
            try:
                await self.actor.state.remote()
                return
            except RayActorError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


AdmissionDeployment = serve.deployment(
    AdmissionReplica,
    name="Admission",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "resources": ON_HEAD_NODE, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    health_check_period_s=5,
    health_check_timeout_s=ACTOR_RESTART_GRACE_S + 5,
    logging_config=NO_ACCESS_LOG,
)
