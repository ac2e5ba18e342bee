"""What Routers and LLMServers hold to reach the Admission actor: one typed method per call.

Calls go straight to the actor (a plain actor call measured 2.4x cheaper than one through a Serve
handle), and the actor is found again through its deployment after a restart. First tokens and releases
are sent in batches: one call in flight at a time carries every report made meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.exceptions import RayActorError

from serve_app.policy.priority import Priority

logger = logging.getLogger("ray.serve")

Release = tuple[str, "int | None", "int | None"]  # request id, output tokens, prompt tokens
FirstToken = tuple[str, float]  # request id, seconds from its grant to its first token
Shape = tuple[int, tuple[int, ...], "int | None"]  # prompt characters, prefix block hashes, max_tokens


@dataclass(frozen=True)
class Grant:
    """A slot on one LLM replica: where to send the request, and how long it waited for the slot. It crosses
    Ray as a plain dict of its fields: Ray serializes that in 2 µs, a dataclass in 11 µs."""

    url: str
    queue_wait_s: float


class AdmissionClient:
    def __init__(self, owner: Any, *, actor: Any = None) -> None:
        """`owner`: the Admission deployment's handle. `actor`: an AdmissionActor object to call in this
        process instead (tests, and harnesses without Ray): the same calls, without the transport."""
        self._owner = owner
        self._local = actor
        self._actor: Any = None
        self._releases: list[Release] = []
        self._first_tokens: list[FirstToken] = []
        self._releasing = False
        self._sender: asyncio.Future[None] | None = None
        self.reports: set[asyncio.Future[None]] = set()  # failure reports under way

    @classmethod
    def in_process(cls, actor: Any) -> AdmissionClient:
        return cls(None, actor=actor)

    # ---- per request ---------------------------------------------------------------------------

    async def acquire(
        self,
        request_id: str,
        priority: Priority,
        router_id: str | None = None,
        front: bool = False,
        tenant: str | None = None,
        shape: Shape | None = None,
    ) -> Grant:
        """Waits for a slot. Raises GatewayError: 429 (overload, with Retry-After), 503 (not ready).
        `router_id` makes the request preemptible; `front` queues it at the head of its class (a retry or a
        restart); `tenant` is whose request it is, for fair shares and the key's rate limits; `shape` its
        prompt's size and prefix (`request_body.prompt_shape`), for placing it."""
        return Grant(**await self._call("acquire", request_id, int(priority), router_id, front, tenant, shape))

    def first_token(self, request_id: str, seconds: float) -> None:
        """The request's first token came `seconds` after its grant: its replica's prefill is done. At once."""
        self._first_tokens.append((request_id, seconds))
        self._send_soon()

    def release(self, request_id: str, tokens: int | None = None, prompt_tokens: int | None = None) -> None:
        """Gives back a slot, or gives up on one still being waited for; idempotent. Returns at once.
        `tokens` and `prompt_tokens`: the answer's usage, when known."""
        self._releases.append((request_id, tokens, prompt_tokens))
        self._send_soon()

    def _send_soon(self) -> None:
        if not self._releasing:
            self._releasing = True
            self._sender = asyncio.ensure_future(self._send_releases())  # held: the loop keeps weak references

    async def answer_preemptions(self, router_id: str, answer: Callable[[list[str]], None]) -> None:
        """Runs until cancelled: Admission's asks that this Router give up slots, each batch of request ids
        handed to `answer`. A failed wait (Admission restarting) is tried again a second later."""
        while True:
            try:
                asked = await self._call("preemptions", router_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("waiting for preemption asks failed; retrying")
                await asyncio.sleep(1)
                continue
            answer(asked)

    def report_failure_soon(self, url: str | None) -> None:
        """`report_failure` without waiting for it: at once, not at the next periodic check, since a dead
        engine must take no more requests, while the stream that found it goes on."""
        if url is None:
            return
        report = asyncio.ensure_future(self.report_failure(url))
        self.reports.add(report)  # held until done: the loop keeps only weak references
        report.add_done_callback(self.reports.discard)

    async def report_failure(self, url: str | None) -> None:
        """Never raises: while Admission restarts, its replicas register again, and the request goes on.
        `None` (a request that never reached a replica) reports nothing."""
        if url is None:
            return
        try:
            await self._call("report_failure", url)
        except Exception:
            logger.exception("reporting the failure of %s failed", url)

    async def state(self) -> dict[str, Any]:
        return await self._call("state")

    async def set_routing(self, routing: str) -> str:
        return await self._call("set_routing", routing)

    # ---- replicas ------------------------------------------------------------------------------

    async def register_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        await self._call("register_replica", replica_id, url, max_ongoing)

    async def ensure_replica(self, replica_id: str, url: str, max_ongoing: int) -> None:
        await self._call("ensure_replica", replica_id, url, max_ongoing)

    async def drain_replica(self, replica_id: str) -> int:
        return await self._call("drain_replica", replica_id)

    async def deregister_replica(self, replica_id: str) -> None:
        await self._call("deregister_replica", replica_id)

    async def replica_load(self, replica_id: str) -> dict[str, int]:
        return await self._call("replica_load", replica_id)

    # ---- transport -----------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any) -> Any:
        if self._local is not None:  # as over Ray, a caller that gives up does not cancel the call itself
            return await asyncio.shield(asyncio.ensure_future(getattr(self._local, method)(*args)))
        for attempt in (1, 2):
            if self._actor is None:
                self._actor = await self._owner.actor_handle.remote()
            try:
                return await getattr(self._actor, method).remote(*args)
            except RayActorError:
                self._actor = None  # restarted with the Admission replica: ask its deployment again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _send_releases(self) -> None:
        try:
            while self._releases or self._first_tokens:
                firsts, self._first_tokens = self._first_tokens, []
                batch, self._releases = self._releases, []
                try:
                    await self._call("progress", firsts, batch)
                except Exception:  # a new actor has no slots to free; nothing is lost by dropping these
                    logger.exception("reporting %d first tokens and %d releases failed", len(firsts), len(batch))
        finally:
            self._releasing = False
