"""The LLM replicas the gateway may dispatch to, and how many requests each holds: pure bookkeeping.

Every dispatch slot belongs to one replica, so the gateway's capacity is the sum of the replicas'
`max_ongoing`, and a slot is granted on the least loaded replica. No Ray, no HTTP, no asyncio.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Replica:
    replica_id: str
    url: str
    max_ongoing: int
    in_flight: int = 0
    live: bool = True  # False once removed: slots still held on it are returned to nobody

    @property
    def free(self) -> int:
        return self.max_ongoing - self.in_flight


class ReplicaSet:
    def __init__(self) -> None:
        self._replicas: dict[str, Replica] = {}

    def __len__(self) -> int:
        return len(self._replicas)

    def __iter__(self):
        return iter(list(self._replicas.values()))

    @property
    def capacity(self) -> int:
        return sum(r.max_ongoing for r in self._replicas.values())

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas.values())

    def add(self, replica_id: str, url: str, max_ongoing: int) -> Replica:
        """A replica that registers again (restarted on the same id) starts from zero."""
        self.remove(replica_id)
        replica = Replica(replica_id, url, max_ongoing)
        self._replicas[replica_id] = replica
        return replica

    def remove(self, replica_id: str) -> Replica | None:
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            replica.live = False
        return replica

    def get(self, replica_id: str) -> Replica | None:
        return self._replicas.get(replica_id)

    def by_url(self, url: str) -> Replica | None:
        return next((r for r in self._replicas.values() if r.url == url), None)

    def take(self) -> Replica | None:
        """One slot on the replica with the most free slots, or None when all are full."""
        best = max(self._replicas.values(), key=lambda r: r.free, default=None)
        if best is None or best.free <= 0:
            return None
        best.in_flight += 1
        return best

    def give_back(self, replica: Replica) -> None:
        if replica.live:
            replica.in_flight -= 1
