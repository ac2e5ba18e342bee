"""Load in tokens, the prefix index and routing by prefix and load: pure policy, milliseconds."""

from __future__ import annotations

import math

import pytest

from serve_app.policy.prefix_index import BLOCK_CHARS, MAX_BLOCKS, PrefixIndex, block_hashes
from serve_app.policy.priority import Priority
from serve_app.policy.replica_set import ReplicaSet
from serve_app.policy.routing import Candidate, Routing, choose, load_of
from serve_app.policy.token_load import (
    PrefillBudget,
    PrefillRate,
    PromptShape,
    ReplicaLoad,
    TokenEstimates,
    Work,
)

SYSTEM = "You are a careful assistant for the billing team. " * 40  # ~2,000 characters


def shape(text: str, max_tokens: int | None = 64, model: str = "m") -> PromptShape:
    return PromptShape(len(text), block_hashes(text, model), max_tokens)


# ---- block hashes and the index ------------------------------------------------------------------


def test_block_hashes_name_whole_prefixes_and_are_stable():
    a = block_hashes(SYSTEM + "question one", "m")
    b = block_hashes(SYSTEM + "another question", "m")
    assert len(a) == (len(SYSTEM) + len("question one")) // BLOCK_CHARS, "only full blocks"
    assert a[: len(SYSTEM) // BLOCK_CHARS] == b[: len(SYSTEM) // BLOCK_CHARS], "a shared prefix, shared hashes"
    assert block_hashes("x" + SYSTEM, "m")[0] != a[0], "a change in block 0 changes every hash after it"
    assert block_hashes(SYSTEM, "other-model")[0] != a[0], "each model its own chain"
    assert block_hashes(SYSTEM, "m") == block_hashes(SYSTEM, "m"), "no per-process salt: every Router agrees"
    assert len(block_hashes("y" * BLOCK_CHARS * (MAX_BLOCKS + 10))) == MAX_BLOCKS, "bounded work per request"
    assert block_hashes("short") == ()
    odd = "\udcff"  # a lone surrogate: valid JSON escape, invalid text; the engine answers it with a 400
    assert len(block_hashes(odd * BLOCK_CHARS, odd)) == 1, "hashing never fails, whatever a client sends"


def test_the_index_matches_leading_blocks_per_replica():
    index = PrefixIndex()
    one, two = block_hashes(SYSTEM + "a" * 600), block_hashes(SYSTEM + "b" * 600)
    index.record(one, "r1")
    shared = len(SYSTEM) // BLOCK_CHARS
    assert index.match(one, ["r1", "r2"]) == {"r1": len(one), "r2": 0}
    assert index.match(two, ["r1", "r2"])["r1"] == shared, "the common prefix only"
    index.record(two, "r2")
    assert index.match(two, ["r1", "r2"]) == {"r1": shared, "r2": len(two)}
    index.forget("r1")
    assert index.match(one, ["r1", "r2"]) == {"r1": 0, "r2": shared}


def test_the_index_is_bounded_and_evicts_a_prefix_from_its_tail():
    index = PrefixIndex(max_entries=10)
    old = block_hashes("o" * BLOCK_CHARS * 6)
    index.record(old, "r1")
    index.record(block_hashes("n" * BLOCK_CHARS * 6), "r1")  # 12 entries: the oldest two go
    assert len(index) == 10
    assert index.match(old, ["r1"]) == {"r1": 4}, "the old prefix lost its last blocks, not its first"
    with pytest.raises(ValueError):
        PrefixIndex(max_entries=0)


# ---- token counts -------------------------------------------------------------------------------


def test_token_estimates_learn_from_the_engines_usage():
    est = TokenEstimates(alpha=0.5)
    assert est.prompt_tokens(4000) == 1000, "4 characters a token before any usage is seen"
    for _ in range(20):
        est.learn(chars=3000, prompt_tokens=1000, output_tokens=100)
    assert est.prompt_tokens(3000) == pytest.approx(1000, rel=0.01)
    assert est.output_tokens(None) == 100 and est.output_tokens(32) == 32
    est.learn(chars=None, prompt_tokens=None, output_tokens=None)  # an answer without usage teaches nothing
    assert est.output_tokens(None) == 100


def test_a_replica_load_counts_prefill_until_the_first_token_and_kv_until_the_end():
    load = ReplicaLoad()
    high = Work(Priority.HIGH, prompt_tokens=2000, cached_tokens=1500, output_tokens=100)
    low = Work(Priority.LOW, prompt_tokens=6000, cached_tokens=0, output_tokens=100)
    load.add(high)
    load.add(low)
    assert load.pending_prefill == 6500
    assert load.pending_ahead_of(Priority.HIGH) == 500, "the engine runs high's prefill first"
    assert load.pending_ahead_of(Priority.LOW) == 6500
    assert load.kv_tokens == 600 + 6100, "shared cached blocks are not counted again"
    load.prefilled(low)
    load.prefilled(low)  # reported twice (a retry's race): counted once
    assert load.pending_prefill == 500
    load.remove(low)
    load.remove(high)
    assert load.pending_prefill == 0 and load.kv_tokens == 0


def test_the_prefill_rate_is_a_decaying_maximum_that_ignores_overhead_samples():
    rate = PrefillRate(decay=0.9, min_tokens=256)
    rate.observe(100, 0.001)  # 100k tokens/s from a tiny prompt: overhead, not a measurement
    assert rate.tokens_per_s is None
    rate.observe(10_000, 0.1)
    assert rate.tokens_per_s == pytest.approx(100_000)
    rate.observe(5_000, 0.1)  # a sample slowed by decode steps in between does not pull it down at once
    assert rate.tokens_per_s == pytest.approx(90_000)
    for _ in range(100):
        rate.observe(5_000, 0.1)  # the engine really is slower now (shared with another load)
    assert rate.tokens_per_s == pytest.approx(50_000)


def test_the_prefill_budget_never_holds_high_and_starts_unbounded():
    budget = PrefillBudget(seconds=1.0, min_tokens=8192)
    rate, load = PrefillRate(), ReplicaLoad()
    load.add(Work(Priority.LOW, 50_000, 0, 10))
    assert budget.admits(load, rate, Priority.LOW), "no rate measured yet: nothing is held back on a guess"
    rate.observe(20_000, 1.0)  # 20k tokens/s measured: a budget of 20k tokens
    assert budget.tokens(rate) == 20_000
    assert not budget.admits(load, rate, Priority.LOW)
    assert budget.admits(load, rate, Priority.MEDIUM), "low's pending prefill runs after medium's"
    load.add(Work(Priority.MEDIUM, 30_000, 0, 10))
    assert not budget.admits(load, rate, Priority.MEDIUM)
    assert budget.admits(load, rate, Priority.HIGH)
    slow = PrefillRate()
    slow.observe(1000, 1.0)
    assert budget.tokens(slow) == 8192, "never below the floor"
    empty = ReplicaLoad()
    assert budget.admits(empty, rate, Priority.LOW), "a request larger than the budget still goes to an idle one"


# ---- routing ------------------------------------------------------------------------------------


def candidate(
    key: str, pending: dict[Priority, int], kv: int, prompt: int, cached: int, prio: Priority, room=8, budget=20_000.0
):
    load = ReplicaLoad(dict(pending), kv)
    return Candidate(key, room, load, Work(prio, prompt, cached, 64), budget)


def test_the_cached_prefix_wins_while_the_load_is_in_balance():
    none = dict.fromkeys(Priority, 0)
    warm = candidate("warm", none, 0, prompt=4000, cached=3900, prio=Priority.MEDIUM)
    cold = candidate("cold", none, 0, prompt=4000, cached=0, prio=Priority.MEDIUM)
    assert choose([cold, warm], Routing.CACHE_AWARE).key == "warm"
    assert choose([cold, warm], Routing.LEAST_LOADED).key == "cold", "the old policy: first of the most room"
    busy = {Priority.HIGH: 0, Priority.MEDIUM: 2000, Priority.LOW: 6000}
    warm_busy = candidate("warm", busy, 10_000, prompt=4000, cached=3900, prio=Priority.MEDIUM)
    assert load_of(warm_busy, class_aware=True) == 2000 + 1000, "low's prefill runs after medium's"
    assert load_of(warm_busy, class_aware=False) == 8000 + 1000
    # 9,000 tokens of load against none: within half the 20k budget, so the cache still wins (the old cost,
    # uncached + 0.5 x load, spilled this request: 100 + 4,500 against a cold 4,000)
    assert choose([cold, warm_busy], Routing.CACHE_AWARE_CLASS_BLIND).key == "warm"
    swamped = candidate("warm", {**busy, Priority.MEDIUM: 12_000}, 20_000, 4000, 3900, Priority.MEDIUM)
    assert choose([cold, swamped], Routing.CACHE_AWARE).key == "cold", "out of balance: load wins over affinity"


def test_every_replica_as_busy_as_the_others_keeps_its_prefixes():
    """Under overload every replica has its budget pending: no spill, whatever the absolute load."""
    full = {Priority.HIGH: 0, Priority.MEDIUM: 40_000, Priority.LOW: 40_000}
    fuller = {Priority.HIGH: 0, Priority.MEDIUM: 60_000, Priority.LOW: 50_000}
    warm = candidate("warm", fuller, 0, prompt=4000, cached=3900, prio=Priority.LOW, budget=80_000)
    cold = candidate("cold", full, 0, prompt=4000, cached=0, prio=Priority.LOW, budget=80_000)
    assert choose([cold, warm], Routing.CACHE_AWARE).key == "warm", "110k against 80k: within 1.5x"
    hot = candidate("hot", {**fuller, Priority.LOW: 200_000}, 0, 4000, 3900, Priority.LOW, budget=80_000)
    assert choose([cold, hot], Routing.CACHE_AWARE).key == "cold", "260k against 80k: out of balance"


def test_a_fresh_replica_without_a_measured_budget_spills_past_the_default_slack():
    none = dict.fromkeys(Priority, 0)
    cold = candidate("cold", none, 0, prompt=4000, cached=0, prio=Priority.MEDIUM, budget=math.inf)
    small = candidate("warm", {**none, Priority.MEDIUM: 8000}, 0, 4000, 3900, Priority.MEDIUM, budget=math.inf)
    big = candidate("warm", {**none, Priority.MEDIUM: 9000}, 0, 4000, 3900, Priority.MEDIUM, budget=math.inf)
    assert choose([cold, small], Routing.CACHE_AWARE).key == "warm"
    assert choose([cold, big], Routing.CACHE_AWARE).key == "cold"


def test_among_equally_cached_replicas_the_lightest_wins():
    none = dict.fromkeys(Priority, 0)
    a = candidate("a", {**none, Priority.LOW: 3000}, 0, prompt=4000, cached=3900, prio=Priority.LOW)
    b = candidate("b", {**none, Priority.LOW: 1000}, 0, prompt=4000, cached=3900, prio=Priority.LOW)
    assert choose([a, b], Routing.CACHE_AWARE).key == "b"


def test_class_aware_routing_keeps_high_on_the_warm_replica_and_spills_low():
    busy = {Priority.HIGH: 0, Priority.MEDIUM: 0, Priority.LOW: 30_000}
    idle = dict.fromkeys(Priority, 0)
    for prio, aware, expected in [
        (Priority.HIGH, Routing.CACHE_AWARE, "warm"),
        (Priority.LOW, Routing.CACHE_AWARE, "cold"),
        (Priority.HIGH, Routing.CACHE_AWARE_CLASS_BLIND, "cold"),
    ]:
        warm = candidate("warm", busy, 5000, prompt=4000, cached=3900, prio=prio)
        cold = candidate("cold", idle, 0, prompt=4000, cached=0, prio=prio)
        assert choose([warm, cold], aware).key == expected, (prio, aware)
    assert choose([], Routing.CACHE_AWARE) is None


def test_requests_sharing_a_prefix_go_to_one_replica_and_others_spread():
    replicas = ReplicaSet()
    for name in "abcd":
        replicas.add(name, f"http://{name}", 64)
    first = replicas.take(Priority.MEDIUM, 0.0, shape(SYSTEM + "question 0"))
    assert first is not None and first.work.cached_tokens == 0
    again = [replicas.take(Priority.MEDIUM, 0.0, shape(SYSTEM + f"question {i}")) for i in range(1, 6)]
    assert {p.replica.replica_id for p in again} == {first.replica.replica_id}
    assert all(p.work.cached_tokens >= len(SYSTEM) // 4 - 64 for p in again), "most of the prompt expected cached"
    others = [replicas.take(Priority.MEDIUM, 0.0, shape(f"unrelated {i} " * 300)) for i in range(3)]
    used = {p.replica.replica_id for p in others}
    assert first.replica.replica_id not in used and len(used) == 3, "without a shared prefix: the least loaded"
    assert replicas.get(first.replica.replica_id).cached_tokens == sum(p.work.cached_tokens for p in again)


def test_placement_counts_and_gives_back_the_load():
    replicas = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=1000))
    a = replicas.add("a", "http://a", 8)
    placed = replicas.take(Priority.LOW, 0.0, shape("z" * 8000, max_tokens=10))
    assert placed is not None and a.load.pending_prefill == 2000 and a.in_flight == 1
    replicas.first_token(placed, seconds=0.5, pending_ahead=0)
    assert a.load.pending_prefill == 0 and a.prefill_rate.tokens_per_s == pytest.approx(4000)
    assert a.load.kv_tokens == 2010
    replicas.give_back(placed)
    assert a.in_flight == 0 and a.load.kv_tokens == 0


def test_medium_and_low_wait_when_the_prefill_budget_is_spent_high_does_not():
    replicas = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=1000))
    a = replicas.add("a", "http://a", 64)
    a.prefill_rate.observe(4000, 1.0)  # 4k tokens/s measured: a budget of 4k tokens

    def long_prompt(i: int) -> PromptShape:
        return shape(f"{i}" + "q" * 11_999)  # 3,000 tokens, none shared

    assert replicas.take(Priority.MEDIUM, 0.0, long_prompt(1)) is not None, "under budget"
    assert replicas.take(Priority.MEDIUM, 0.0, long_prompt(2)) is not None, "3,000 pending < 4,000: still room"
    assert replicas.take(Priority.MEDIUM, 0.0, long_prompt(3)) is None, "6,000 pending: medium waits in the gateway"
    assert replicas.take(Priority.LOW, 0.0, long_prompt(3)) is None, "and low, behind it"
    assert replicas.take(Priority.HIGH, 0.0, long_prompt(4)) is not None, "high is never held by the budget"
    assert a.in_flight == 3 and math.isclose(a.load.pending_prefill, 9000)


def test_medium_counts_only_the_prefill_that_runs_before_it():
    """The engine runs medium's prefill before low's: low's backlog does not keep medium in the gateway."""
    replicas = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=1000))
    a = replicas.add("a", "http://a", 64)
    a.prefill_rate.observe(4000, 1.0)
    lows = [replicas.take(Priority.LOW, 0.0, shape(f"{i}" + "q" * 11_999)) for i in range(3)]
    assert [p is not None for p in lows] == [True, True, False], "low: 6,000 pending, past the 4,000 budget"
    assert replicas.take(Priority.MEDIUM, 0.0, shape("m" + "q" * 11_999)) is not None, "no medium pending"
    assert replicas.take(Priority.MEDIUM, 0.0, shape("n" + "q" * 11_999)) is not None, "3,000 of medium's"
    assert replicas.take(Priority.MEDIUM, 0.0, shape("o" + "q" * 11_999)) is None, "6,000 of medium's: full"
    assert a.load.pending_ahead_of(Priority.MEDIUM) == 6000 and a.load.pending_prefill == 12_000


def test_a_short_prompt_load_is_bounded_by_slots_alone():
    replicas = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=8192))
    a = replicas.add("a", "http://a", 4)
    a.prefill_rate.observe(100_000, 1.0)
    placed = [replicas.take(Priority.LOW, 0.0, shape("hello there " * 5)) for _ in range(5)]
    assert [p is not None for p in placed] == [True] * 4 + [False], "max_ongoing is the bound"


def test_under_overload_a_request_waits_for_its_warm_replica_unless_the_others_are_far_less_loaded():
    replicas = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=1000))
    warm, cold = replicas.add("warm", "http://warm", 64), replicas.add("cold", "http://cold", 64)
    for r in (warm, cold):
        r.prefill_rate.observe(20_000, 1.0)  # a budget of 20k pending tokens each
    first = replicas.take(Priority.LOW, 0.0, shape(SYSTEM * 4 + "q0"))  # ~2,000 tokens, 7k characters shared
    assert first is not None and first.replica is warm
    warm.load.pending[Priority.LOW] += 16_000  # both near their budget: an overload
    cold.load.pending[Priority.LOW] += 18_000
    assert replicas.take(Priority.LOW, 0.0, shape(SYSTEM * 4 + "q1")).replica is warm, "within budget: warm"
    warm.load.pending[Priority.LOW] += 2_000
    assert warm.load.pending_prefill >= 20_000
    assert replicas.take(Priority.LOW, 0.0, shape(SYSTEM * 4 + "q2")) is None, (
        "warm is past its budget and cold would prefill the whole prompt again: wait for warm"
    )
    assert replicas.take(Priority.LOW, 0.0, shape("unrelated " * 200)).replica is cold, "no cache to keep: cold"
    cold.load.pending[Priority.LOW] = 0  # cold drained: far less loaded than warm
    assert replicas.take(Priority.LOW, 0.0, shape(SYSTEM * 4 + "q3")).replica is cold, "imbalanced: it spills"
    ll = ReplicaSet(budget=PrefillBudget(seconds=1.0, min_tokens=1000), routing_policy=Routing.LEAST_LOADED)
    a, b = ll.add("a", "http://a", 64), ll.add("b", "http://b", 64)
    a.prefill_rate.observe(2000, 1.0)
    a.load.pending[Priority.LOW] = 5000
    assert ll.take(Priority.LOW, 0.0, shape("x" * 4000)).replica is b, "least_loaded takes any replica in budget"
