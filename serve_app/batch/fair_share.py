"""Which batches the runner takes its next lines from: fair shares between tenants (API keys), then between each
tenant's batches, so that one tenant's large batch does not hold back another's. Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def next_batches(active: Sequence[tuple[str, str]], running: Counter[str], free: int) -> list[str]:
    """`active`: (batch id, owner) of the batches with lines to run, oldest first; `running`: lines in flight per
    batch id. Returns `free` batch ids, one per line to start: each time the owner with the fewest lines in flight,
    and within it the batch with the fewest (the oldest on ties)."""
    if not active or free <= 0:
        return []
    running = Counter({batch_id: running.get(batch_id, 0) for batch_id, _ in active})
    by_owner: dict[str, list[str]] = {}
    for batch_id, owner in active:
        by_owner.setdefault(owner, []).append(batch_id)
    order = list(by_owner)
    chosen = []
    for _ in range(free):
        owner = min(order, key=lambda o: (sum(running[b] for b in by_owner[o]), order.index(o)))
        batch_id = min(by_owner[owner], key=lambda b: (running[b], by_owner[owner].index(b)))
        running[batch_id] += 1
        chosen.append(batch_id)
    return chosen
