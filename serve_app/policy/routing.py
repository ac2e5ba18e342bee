"""Which replica a request goes to, among those with room for its class: by cached prefix and token load.

The cost of a replica is what delays the request's first token there and what it adds, in prompt tokens:

    cost = its own uncached prompt + load_weight x (prefill pending ahead of it + decode_weight x KV tokens)

- its own uncached prompt is small where its prefix is cached (`prefix_index`): affinity. It is work the
  whole gateway saves, not only this request's delay, so it weighs more than the queue ahead: a token of
  prefill saved is worth 1/load_weight tokens of queue. An engine also prefills several prompts in one step
  (chunked prefill), so a queue of a few thousand tokens delays a request less than its size says;
- pending prefill and KV tokens grow on a busy replica: a warm but overloaded replica loses to a cold idle
  one once its queue passes what the cache saves, times 1/load_weight (load balance, as in Dynamo's KV
  router, whose cost is uncached prefill blocks plus decode blocks);
- class-aware: the prefill ahead of a request is only that of its class and the classes above it, since
  the engine schedules by priority. A busy warm replica still looks free to high, which keeps its cache
  hits, while medium and low see the backlog and spill to other replicas.

`least_loaded` is the old policy (the most free slots for the class), kept for comparison. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from serve_app.policy.token_load import ReplicaLoad, Work

# A KV token held by running requests slows a replica's decode steps far less than a prompt token to
# prefill delays the next first token: one tenth of it, as a start (docs/qos.md).
DECODE_WEIGHT = 0.1
# The queue ahead, against a prompt token saved: see the module's docstring.
LOAD_WEIGHT = 0.5


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


def cost(candidate: Candidate[K], class_aware: bool, decode_weight: float = DECODE_WEIGHT) -> float:
    load, work = candidate.load, candidate.work
    ahead = load.pending_ahead_of(work.priority) if class_aware else load.pending_prefill
    return work.prefill_tokens + LOAD_WEIGHT * (ahead + decode_weight * load.kv_tokens)


def choose(
    candidates: Sequence[Candidate[K]], routing: Routing, decode_weight: float = DECODE_WEIGHT
) -> Candidate[K] | None:
    """The cheapest candidate (most room on a tie), or None when there is none."""
    if not candidates:
        return None
    if routing is Routing.LEAST_LOADED:
        return max(candidates, key=lambda c: c.room)
    class_aware = routing is Routing.CACHE_AWARE
    return min(candidates, key=lambda c: (cost(c, class_aware, decode_weight), -c.room))
