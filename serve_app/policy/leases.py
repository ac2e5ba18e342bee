"""Grants as leases: what a Router holds is its own only while it keeps calling in.

A Router that dies (SIGKILL, its node lost) never releases its slots nor cancels the requests it queued, and
Admission cannot see it die: a Ray call from a dead caller is not cancelled. So each Router renews its lease by
its standing `preemptions` call, which Admission answers at least every `lease_s / 3`; a Router not heard from
for `lease_s` is taken for dead, and what it held is freed. The cost is one call per Router per `lease_s / 3`,
never per request. A Router that comes back has a new id, so it starts clean. Pure: times in, owners out.
"""

from __future__ import annotations


class Leases:
    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = lease_s
        self._seen: dict[str, float] = {}

    @property
    def renew_s(self) -> float:
        """How often a holder must call in: three times a lease, so that one late call loses nothing."""
        return self.lease_s / 3

    def touch(self, owner: str, now: float) -> None:
        self._seen[owner] = max(now, self._seen.get(owner, now))

    def expired(self, now: float) -> list[str]:
        """The owners not heard from for a lease, forgotten here: the caller frees what they held."""
        gone = [owner for owner, at in self._seen.items() if now - at > self.lease_s]
        for owner in gone:
            del self._seen[owner]
        return gone

    def __contains__(self, owner: str) -> bool:
        return owner in self._seen

    def __len__(self) -> int:
        return len(self._seen)
