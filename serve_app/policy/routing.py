"""Which replica a request goes to, among those with room for its class: its cached prefix first, load when the
replicas are out of balance.

- **Cache first.** Among the replicas whose load is in balance with the lightest one, the request goes where the
  least of its prompt is left to prefill (`prefix_index`), then to the lightest of those. A prefill saved is
  compute the whole gateway saves, and a prefix kept on one replica stays in its cache: sending it to a second
  replica as well evicts other prefixes there. Measured on an H200 with four replicas, a cost that traded the
  saved prefill against the queue (uncached + 0.5 x pending) spilled most requests under load, and vLLM's
  prefix-hit rate stayed at 15-20% (docs/benchmarks.md, seventh session).
- **Load when out of balance** (SGLang's cache-aware router does the same): a replica whose load is both more
  than `BALANCE_RATIO` times the lightest's and more than the lightest's plus `SPILL_SHARE` of its prefill
  budget is left out, and the request goes to a lighter one, which then warms up to that prefix. A hot prefix
  so spreads over as many replicas as its load needs, and no more.
- **Load** is the prefill pending ahead of the request plus `DECODE_WEIGHT` x the KV tokens held: a KV token
  slows decode steps far less than a prompt token to prefill delays the next first token.
- **Class-aware**: the prefill ahead of a request is only that of its class and the classes above it, since the
  engine schedules by priority. A warm replica busy with low's backlog is still in balance for high, which keeps
  its cache hits, while medium and low see the backlog and spill to other replicas.

`least_loaded` is the old policy (the most free slots for the class), kept for comparison. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from serve_app.policy.token_load import ReplicaLoad, Work

# A KV token held by running requests slows a replica's decode steps far less than a prompt token to
# prefill delays the next first token: one tenth of it, as a start (docs/qos.md).
DECODE_WEIGHT = 0.1
# Out of balance: more than this times the lightest replica's load ...
BALANCE_RATIO = 1.5
# ... and more than the lightest's plus this share of the replica's prefill budget (about half a second of
# its prefill), so that the small differences of a lightly loaded gateway never break affinity.
SPILL_SHARE = 0.5
# The absolute slack, in tokens, while a replica's budget is not measured yet (a fresh replica).
DEFAULT_SPILL_TOKENS = 8192


class Routing(str, Enum):
    CACHE_AWARE = "cache_aware"
    CACHE_AWARE_CLASS_BLIND = "cache_aware_class_blind"
    LEAST_LOADED = "least_loaded"


K = TypeVar("K")


@dataclass(frozen=True)
class Candidate(Generic[K]):
    key: K  # the caller's replica
    room: int  # slots left for the request's class
    load: ReplicaLoad
    work: Work  # the request's work as it would be there (its cached part is that replica's)
    budget_tokens: float = math.inf  # the replica's prefill budget (inf: not measured yet)


def load_of(candidate: Candidate[K], class_aware: bool, decode_weight: float = DECODE_WEIGHT) -> float:
    """The load that delays the request there, in prompt tokens."""
    load, work = candidate.load, candidate.work
    ahead = load.pending_ahead_of(work.priority) if class_aware else load.pending_prefill
    return ahead + decode_weight * load.kv_tokens


def spill_tokens(candidate: Candidate[K]) -> float:
    budget = candidate.budget_tokens
    return SPILL_SHARE * budget if math.isfinite(budget) else float(DEFAULT_SPILL_TOKENS)


def choose(
    candidates: Sequence[Candidate[K]], routing: Routing, decode_weight: float = DECODE_WEIGHT
) -> Candidate[K] | None:
    """The replica for the request (most room on a tie), or None when there is none."""
    if not candidates:
        return None
    if routing is Routing.LEAST_LOADED:
        return max(candidates, key=lambda c: c.room)
    class_aware = routing is Routing.CACHE_AWARE
    loads = [load_of(c, class_aware, decode_weight) for c in candidates]
    lightest = min(loads)
    balanced = [
        (c, load)
        for c, load in zip(candidates, loads, strict=True)
        if load <= BALANCE_RATIO * lightest or load <= lightest + spill_tokens(c)
    ]
    return min(balanced, key=lambda cl: (cl[0].work.prefill_tokens, cl[1], -cl[0].room))[0]
