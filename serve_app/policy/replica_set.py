"""The LLM replicas the gateway may dispatch to, what each holds, and where the next request goes: pure bookkeeping.

Every dispatch slot belongs to one replica. A replica takes a request of a class while it has a slot left
for that class (`max_ongoing`, less the reserves of the classes above it that are in use: `reservation`),
and, for medium and low, while its pending prefill is within its budget (`token_load.PrefillBudget`).
Among the replicas that can take it, `routing` picks by cached prefix and token load. No Ray, no HTTP,
no asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.policy import routing
from serve_app.policy.prefix_index import BLOCK_CHARS, PrefixIndex
from serve_app.policy.priority import Priority
from serve_app.policy.reservation import Demand, Reservation
from serve_app.policy.routing import Candidate, Routing
from serve_app.policy.token_load import PrefillBudget, PrefillRate, PromptShape, ReplicaLoad, TokenEstimates, Work

__all__ = ["Placement", "Replica", "ReplicaSet", "Reservation", "Routing"]


@dataclass(eq=False)
class Replica:
    replica_id: str
    url: str
    max_ongoing: int
    in_flight: int = 0
    dispatched: int = 0  # requests ever sent here
    cached_tokens: int = 0  # prompt tokens the index expected it to have cached, over those requests
    prompt_tokens: int = 0
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    prefill_rate: PrefillRate = field(default_factory=PrefillRate)
    live: bool = True  # False once removed: slots still held on it are returned to nobody
    draining: bool = False  # shutting down: finishes what it runs, takes nothing new

    @property
    def limit(self) -> int:
        return 0 if self.draining else self.max_ongoing

    @property
    def free(self) -> int:
        return self.limit - self.in_flight


@dataclass(eq=False)
class Placement:
    """A slot on `replica` for one request, and the work it was counted as there."""

    replica: Replica
    work: Work


class ReplicaSet:
    def __init__(
        self,
        reservation: Reservation | None = None,
        budget: PrefillBudget | None = None,
        routing_policy: Routing = Routing.CACHE_AWARE,
        index: PrefixIndex | None = None,
        decode_weight: float = routing.DECODE_WEIGHT,
    ) -> None:
        """`budget`: the pending prefill that medium and low may leave on a replica; None holds nothing back."""
        self._replicas: dict[str, Replica] = {}
        self.reservation = reservation or Reservation()
        self.budget = budget
        self.routing = routing_policy
        self.index = index if index is not None else PrefixIndex()
        self.decode_weight = decode_weight
        self.estimates = TokenEstimates()
        self.high_demand = Demand()
        self._last_arrival: dict[Priority, float] = {}

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self):
        return iter(list(self._replicas.values()))

    @property
    def capacity(self) -> int:
        """Every serving replica's max_ongoing (a draining one takes nothing new)."""
        return sum(r.max_ongoing for r in self._replicas.values() if not r.draining)

    @property
    def limit(self) -> int:
        """What the gateway may run at once now: every replica's limit."""
        return sum(r.limit for r in self._replicas.values())

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas.values())

    def add(self, replica_id: str, url: str, max_ongoing: int) -> Replica:
        """A replica that registers again (restarted on the same id) starts from zero, its cache too."""
        self.remove(replica_id)
        replica = Replica(replica_id, url, max_ongoing)
        self._replicas[replica_id] = replica
        return replica

    def remove(self, replica_id: str) -> Replica | None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            replica.live = False
            self.index.forget(replica_id)
        return replica

    def drain(self, replica_id: str) -> Replica | None:
        """The replica is shutting down: no new slot goes there; those it holds come back as they finish."""
        replica = self._replicas.get(replica_id)
        if replica is not None:
            replica.draining = True
        return replica

    @property
    def serving(self) -> int:
        """Replicas that take new requests."""
        return sum(1 for r in self._replicas.values() if not r.draining)

    def get(self, replica_id: str) -> Replica | None:
        return self._replicas.get(replica_id)

    def by_url(self, url: str) -> Replica | None:
        return next((r for r in self._replicas.values() if r.url == url), None)

    # ---- reserves ----------------------------------------------------------------------------------

    def arrived(self, priority: Priority, now: float) -> None:
        """A request of this class arrived: the shares held for it are held from now for `hold_s`."""
        self._last_arrival[priority] = now
        if priority == Priority.HIGH:
            self.high_demand.arrived(now)

    def active_classes(self, now: float | None) -> Callable[[Priority], bool] | None:
        """Which reserves are held at `now`: that of class k while k or a class above it arrived within
        `hold_s`. None (every share held) without a time or a `hold_s`."""
        hold_s = self.reservation.hold_s
        if hold_s is None or now is None:
            return None
        recent = [p for p, at in self._last_arrival.items() if now - at <= hold_s]
        return lambda k: any(p <= k for p in recent)

    def next_release_of_shares(self, now: float) -> float | None:
        """When the next held share lapses (a class's `hold_s` after its last arrival), or None."""
        hold_s = self.reservation.hold_s
        if hold_s is None:
            return None
        return min((at + hold_s for at in self._last_arrival.values() if at + hold_s > now), default=None)

    def high_reserve(self, now: float | None) -> int:
        """High's reserved slots on each replica, when they come from its demand."""
        if not self.reservation.high_from_demand:
            return 0
        return self.high_demand.reserve(now if now is not None else 0.0, max(self.serving, 1))

    def room(self, replica: Replica, priority: Priority, now: float | None = None) -> int:
        return self._room(replica, priority, self.active_classes(now), self.high_reserve(now))

    def _room(
        self, replica: Replica, priority: Priority, in_use: Callable[[Priority], bool] | None, high_slots: int
    ) -> int:
        return self.reservation.allowed(replica.limit, priority, in_use, high_slots) - replica.in_flight

    def can_take(self, priority: Priority, now: float | None = None) -> bool:
        """A slot is free for the class on some replica (the prefill budget aside: it never holds high)."""
        in_use, high_slots = self.active_classes(now), self.high_reserve(now)
        return any(self._room(r, priority, in_use, high_slots) > 0 for r in self._replicas.values())

    # ---- placing -----------------------------------------------------------------------------------

    def work(self, replica: Replica, priority: Priority, shape: PromptShape, matched_blocks: int = 0) -> Work:
        prompt = self.estimates.prompt_tokens(shape.chars)
        cached = min(self.estimates.prompt_tokens(matched_blocks * BLOCK_CHARS), prompt - 1) if matched_blocks else 0
        return Work(priority, prompt, cached, self.estimates.output_tokens(shape.max_tokens))

    def take(
        self, priority: Priority = Priority.HIGH, now: float | None = None, shape: PromptShape | None = None
    ) -> Placement | None:
        """A slot for a request of this class on the replica `routing` picks, or None when none can take it."""
        shape = shape or PromptShape()
        in_use, high_slots = self.active_classes(now), self.high_reserve(now)  # once per call, not per replica
        slotted = [
            (r, room) for r in self._replicas.values() if (room := self._room(r, priority, in_use, high_slots)) > 0
        ]
        if self.routing is Routing.LEAST_LOADED:  # blind to caches: any replica within its budget will do
            slotted = [(r, room) for r, room in slotted if self._within_budget(r, priority)]
        if not slotted:
            return None
        matched = self.index.match(shape.blocks, (r.replica_id for r, _ in slotted)) if shape.blocks else {}
        candidates = [
            Candidate(
                r, room, r.load, self.work(r, priority, shape, matched.get(r.replica_id, 0)), self.budget_tokens(r)
            )
            for r, room in slotted
        ]
        best = routing.choose(candidates, self.routing, self.decode_weight)
        assert best is not None
        replica, work = best.key, best.work
        # The chosen replica may be past its budget: the request then waits for it, rather than taking a cold
        # replica (its whole prefill again, and another prefix evicted there) because that one freed first.
        # `routing` already left out replicas loaded out of balance: then the request spills.
        if not self._within_budget(replica, priority):
            return None
        return self._place(replica, work, shape)

    def adopt(self, replica: Replica, priority: Priority, shape: PromptShape, prefilling: bool) -> Placement:
        """Counts a request already running on `replica` (granted before Admission restarted), whatever
        room the replica has: it runs there already. `prefilling`: no first token yet."""
        placement = self._place(replica, self.work(replica, priority, shape), shape)
        if not prefilling:
            replica.load.prefilled(placement.work)
        return placement

    def _place(self, replica: Replica, work: Work, shape: PromptShape) -> Placement:
        replica.in_flight += 1
        replica.dispatched += 1
        replica.prompt_tokens += work.prompt_tokens
        replica.cached_tokens += work.cached_tokens
        replica.load.add(work)
        if shape.blocks:
            self.index.record(shape.blocks, replica.replica_id)
        return Placement(replica, work)

    def budget_tokens(self, replica: Replica) -> float:
        """The pending prefill that medium and low may leave on the replica now (inf: unbounded)."""
        return math.inf if self.budget is None else self.budget.tokens(replica.prefill_rate)

    def _within_budget(self, replica: Replica, priority: Priority) -> bool:
        return self.budget is None or self.budget.admits(replica.load, replica.prefill_rate, priority)

    def first_token(self, placement: Placement, seconds: float, pending_ahead: int) -> None:
        """The request's first token came `seconds` after its dispatch, with `pending_ahead` prefill tokens
        pending ahead of it then: its prefill is done, and the replica's prefill rate learns from it."""
        work = placement.work
        if not work.prefilling or not placement.replica.live:
            return
        placement.replica.load.prefilled(work)
        placement.replica.prefill_rate.observe(pending_ahead + work.prefill_tokens, seconds)

    def give_back(self, placement: Placement) -> None:
        replica = placement.replica
        if replica.live:
            replica.in_flight -= 1
            replica.load.remove(placement.work)
