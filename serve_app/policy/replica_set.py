"""The LLM replicas the gateway may dispatch to, and how many requests each may run: pure bookkeeping.

Every dispatch slot belongs to one replica. A replica's limit is its knee (`concurrency_limit`)
when adaptive admission is on, else its `max_ongoing`; a share of that limit is reserved for the
higher classes (`Reservation`) while those classes are in use, and a slot is granted on the replica
with the most room for the asking class. No Ray, no HTTP, no asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from serve_app.policy.concurrency_limit import KneeLimit
from serve_app.policy.priority import Priority


@dataclass(frozen=True)
class Reservation:
    """`shares[k]`: the part of each replica's limit that only class k and the classes above it may use.

    `hold_s`: a share is held back only while a class it is for has arrived within the last `hold_s` seconds
    (None: always). Without it, a gateway that sees no high request still idles high's share: measured on an
    H200, an all-medium load at 256 concurrent ran 230 at a time and gave 0.76x bare vLLM's tokens/s."""

    shares: Mapping[Priority, float] = field(default_factory=dict)
    hold_s: float | None = None

    @classmethod
    def for_classes(cls, high: float = 0.0, medium: float = 0.0, hold_s: float | None = None) -> Reservation:
        """`high`: share only high may use; `medium`: a further share high and medium may use, low may not."""
        if high < 0 or medium < 0 or high + medium >= 1:
            raise ValueError("reserved shares must be >= 0 and leave low part of the slots")
        if hold_s is not None and hold_s <= 0:
            raise ValueError("hold_s must be positive, or None to hold the shares always")
        return cls({Priority.HIGH: high, Priority.MEDIUM: medium}, hold_s)

    def allowed(self, limit: int, priority: Priority, in_use: Callable[[Priority], bool] | None = None) -> int:
        """Slots of `limit` that `priority` may fill: all but the shares of the classes above it that are in use
        (`in_use(k)`, from `ReplicaSet.active_classes`: a request of class k or above arrived lately; None: all are). At least one, so a class
        never waits on an idle replica."""
        share = sum(s for k, s in self.shares.items() if k < priority and (in_use is None or in_use(k)))
        if share <= 0 or limit <= 1:
            return limit
        return max(1, limit - math.ceil(round(limit * share, 9)))


@dataclass(eq=False)
class Replica:
    replica_id: str
    url: str
    max_ongoing: int
    limiter: KneeLimit | None = None
    in_flight: int = 0
    dispatched: int = 0  # requests ever sent here
    live: bool = True  # False once removed: slots still held on it are returned to nobody
    draining: bool = False  # shutting down: finishes what it runs, takes nothing new

    @property
    def limit(self) -> int:
        if self.draining:
            return 0
        return self.limiter.limit if self.limiter is not None else self.max_ongoing

    @property
    def free(self) -> int:
        return self.limit - self.in_flight


class ReplicaSet:
    def __init__(
        self,
        reservation: Reservation | None = None,
        limiter_factory: Callable[[int], KneeLimit] | None = None,
    ) -> None:
        """`limiter_factory(max_ongoing)` gives each replica its adaptive limit; None keeps max_ongoing."""
        self._replicas: dict[str, Replica] = {}
        self.reservation = reservation or Reservation()
        self._limiter_factory = limiter_factory
        self._last_arrival: dict[Priority, float] = {}

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self):
        return iter(list(self._replicas.values()))

    @property
    def capacity(self) -> int:
        """The upper bound: every serving replica's max_ongoing (a draining one takes nothing new)."""
        return sum(r.max_ongoing for r in self._replicas.values() if not r.draining)

    @property
    def limit(self) -> int:
        """What the gateway runs at once now: every replica's current limit."""
        return sum(r.limit for r in self._replicas.values())

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas.values())

    def add(self, replica_id: str, url: str, max_ongoing: int) -> Replica:
        """A replica that registers again (restarted on the same id) starts from zero."""
        self.remove(replica_id)
        limiter = self._limiter_factory(max_ongoing) if self._limiter_factory else None
        replica = Replica(replica_id, url, max_ongoing, limiter)
        self._replicas[replica_id] = replica
        return replica

    def remove(self, replica_id: str) -> Replica | None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            replica.live = False
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

    def arrived(self, priority: Priority, now: float) -> None:
        """A request of this class arrived: the shares held for it are held from now for `hold_s`."""
        self._last_arrival[priority] = now

    def active_classes(self, now: float | None) -> Callable[[Priority], bool] | None:
        """Which reserved shares are held at `now`: that of class k while k or a class above it arrived within
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

    def room(self, replica: Replica, priority: Priority, now: float | None = None) -> int:
        return self._room(replica, priority, self.active_classes(now))

    def _room(self, replica: Replica, priority: Priority, in_use: Callable[[Priority], bool] | None) -> int:
        return self.reservation.allowed(replica.limit, priority, in_use) - replica.in_flight

    def can_take(self, priority: Priority, now: float | None = None) -> bool:
        in_use = self.active_classes(now)
        return any(self._room(r, priority, in_use) > 0 for r in self._replicas.values())

    def take(self, priority: Priority = Priority.HIGH, now: float | None = None) -> Replica | None:
        """One slot on the replica with the most room for this class, or None when none has room."""
        in_use = self.active_classes(now)  # once per call, not once per replica
        rooms = ((r, self._room(r, priority, in_use)) for r in self._replicas.values())
        best, room = max(rooms, key=lambda pair: pair[1], default=(None, 0))
        if best is None or room <= 0:
            return None
        best.in_flight += 1
        best.dispatched += 1
        return best

    def give_back(self, replica: Replica) -> None:
        if replica.live:
            replica.in_flight -= 1
