"""Fair shares between tenants within a priority class: a virtual token counter per tenant.

In the spirit of the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): each tenant's counter grows with the tokens served to it, and within a class
the waiting request of the tenant with the smallest counter goes first. A tenant that was idle
comes back at the smallest counter of the tenants now waiting, so idle time banks no credit.

Output tokens are known only when a request ends, so a grant charges the mean answer length at
once and the release corrects it: a tenant with many queued requests cannot take every free slot
before its first answers come back. Pure bookkeeping: no Ray, no HTTP, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable

# Tenants remembered at most; past it, those with nothing waiting are forgotten (they come back at
# the waiting tenants' smallest counter, as after any idle time).
MAX_TENANTS = 10_000


class TenantCounters:
    def __init__(self, initial_estimate: float = 64.0, alpha: float = 0.1) -> None:
        self._served: dict[str, float] = {}
        self.estimate = initial_estimate  # the mean output tokens of a request, charged at grant
        self._alpha = alpha

    def counter(self, tenant: str) -> float:
        return self._served.get(tenant, 0.0)

    def arrive(self, tenant: str, waiting: Iterable[str]) -> None:
        """`tenant` has a new waiting request; `waiting` are the tenants that already have one there.
        A tenant that had none is lifted to the smallest counter among them."""
        waiting = set(waiting)
        if tenant not in waiting and waiting:
            floor = min(self._served.get(t, 0.0) for t in waiting)
            self._served[tenant] = max(self._served.get(tenant, 0.0), floor)
        if len(self._served) > MAX_TENANTS:
            keep = waiting | {tenant}
            self._served = {t: c for t, c in self._served.items() if t in keep}

    def granted(self, tenant: str) -> float:
        """Charges the expected answer now; returns the charge, to be corrected by `finished`."""
        self._served[tenant] = self._served.get(tenant, 0.0) + self.estimate
        return self.estimate

    def finished(self, tenant: str, charged: float, tokens: int | None) -> None:
        """Replaces the grant's estimate with the tokens really served (when known)."""
        if tokens is None:
            return
        if tenant in self._served:
            self._served[tenant] += tokens - charged
        self.estimate += self._alpha * (tokens - self.estimate)
