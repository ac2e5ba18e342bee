"""Queueing on the real gateway, whose capacity is one request at a time (see conftest)."""

from __future__ import annotations

import asyncio
import json
import random
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from conftest import APP_NAME, MODEL_ID, stats, wait_for

pytestmark = pytest.mark.engine

LONG = {  # generates for many seconds unless aborted
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 1900,
    "ignore_eos": True,
    "stream": True,
}
SHORT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}


@asynccontextmanager
async def slot_holder(http: httpx.AsyncClient):
    """Holds the gateway's only slot with a long stream until the block exits, then disconnects."""
    async with http.stream("POST", "/v1/chat/completions", json=LONG, headers={"X-Priority": "low"}) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        while not (await anext(lines)).startswith("data: "):
            pass
        yield


def queued(base_url: str) -> dict[str, int]:
    router = stats(base_url)["router"]
    return {p: router[f"queued_{p}"] for p in ("high", "medium", "low")}


async def first_chunk_time(http: httpx.AsyncClient, priority: str, body: dict = SHORT) -> float:
    started = None
    async with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Priority": priority}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if started is None and line.startswith("data: "):
                started = time.monotonic()
    assert started is not None, "no data"
    return started


async def until(predicate, timeout_s: float = 20.0) -> None:
    assert await asyncio.to_thread(wait_for, predicate, timeout_s), "condition not reached in time"


async def test_high_starts_before_queued_lows(gateway):
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        async with slot_holder(http):
            lows = []
            for n in range(1, 4):
                lows.append(asyncio.create_task(first_chunk_time(http, "low")))
                await until(lambda n=n: queued(gateway)["low"] == n)
            high = asyncio.create_task(first_chunk_time(http, "high"))
            await until(lambda: queued(gateway)["high"] == 1)
        # The holder disconnected: its slot goes to the queue's pick, one request at a time.
        high_started = await high
        low_started = await asyncio.gather(*lows)
    assert high_started < min(low_started), "the high request must start before every queued low one"
    assert low_started == sorted(low_started), "lows are served first in, first out"


async def test_within_a_class_a_light_tenant_is_not_stuck_behind_a_heavy_ones_backlog(gateway):
    """Four requests of user 'heavy' queue, then two of user 'light': fair shares interleave them."""
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        async with slot_holder(http):
            waiting = {}
            for count, name in enumerate(["heavy0", "heavy1", "heavy2", "heavy3", "light0", "light1"], start=1):
                body = {**SHORT, "user": f"fairness-{name[:5]}"}
                waiting[name] = asyncio.create_task(first_chunk_time(http, "medium", body))
                await until(lambda n=count: queued(gateway)["medium"] == n)
        started = dict(zip(waiting, await asyncio.gather(*waiting.values()), strict=True))
    order = sorted(started, key=started.get)
    print("\norder served:", order)
    assert max(started["light0"], started["light1"]) < min(started["heavy2"], started["heavy3"])
    assert [n for n in order if n.startswith("heavy")] == ["heavy0", "heavy1", "heavy2", "heavy3"], "FIFO per tenant"


async def test_full_queue_answers_429_with_retry_after(gateway):
    before = stats(gateway)["priorities"]["low"]["rejected"]
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        async with slot_holder(http):
            waiting = [asyncio.create_task(first_chunk_time(http, "low")) for _ in range(3)]
            await until(lambda: queued(gateway)["low"] == 3)
            rejected = await http.post("/v1/chat/completions", json=SHORT, headers={"X-Priority": "low"})
            assert rejected.status_code == 429
            assert int(rejected.headers["retry-after"]) >= 1
            assert rejected.json()["error"]["type"] == "RateLimitError"
            # Other classes have their own bounds: a medium request is still queued, not rejected.
            medium = asyncio.create_task(first_chunk_time(http, "medium"))
            await until(lambda: queued(gateway)["medium"] == 1)
        await asyncio.gather(medium, *waiting)
    after = stats(gateway, until=lambda s: s["priorities"]["low"]["rejected"] - before == 1)["priorities"]["low"]
    assert after["rejected"] - before == 1
    assert after["errors_by_kind"].get("rejected:queue_full", 0) >= 1


async def test_client_gone_while_queued_leaves_the_queue(gateway):
    before = stats(gateway)["priorities"]["medium"]["cancelled"]
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        async with slot_holder(http):
            waiter = asyncio.create_task(first_chunk_time(http, "medium"))
            await until(lambda: queued(gateway)["medium"] == 1)
            waiter.cancel()
            await until(lambda: queued(gateway)["medium"] == 0, timeout_s=5)
    await until(lambda: stats(gateway)["priorities"]["medium"]["cancelled"] - before == 1)


async def test_client_gone_mid_generation_aborts_the_engine_request(gateway):
    from ray import serve

    llm = serve.get_deployment_handle("LLMServer", APP_NAME)
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        async with slot_holder(http):
            assert await llm.num_unfinished.remote() == 1
        # 1900 tokens take far longer than this: only an abort empties the engine so soon.
        deadline = time.monotonic() + 10
        while await llm.num_unfinished.remote() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await llm.num_unfinished.remote() == 0
        # The Router's release reaches Admission just after the abort.
        assert stats(gateway, until=lambda s: s["router"]["in_flight"] == 0)["router"]["in_flight"] == 0
        response = await http.post("/v1/chat/completions", json={**SHORT, "stream": False})
        assert response.status_code == 200


WORDS = "the of and to in is you that it he was for on are as with his they at be this have from or one had by".split()


async def stream_chunks(http: httpx.AsyncClient, body: dict, priority: str) -> tuple[float, list[dict]]:
    """The time of the first data event, and every event's JSON, [DONE] excluded (asserted to come last)."""
    first = None
    events: list[dict] = []
    done = False
    async with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Priority": priority}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            first = first or time.monotonic()
            assert not done, "nothing may follow [DONE]"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    assert done and first is not None
    return first, events


async def test_a_waiting_high_request_preempts_a_low_one_before_its_first_token(gateway):
    """The only slot holds a low request still in its prefill (a long prompt no cache has seen); a high
    request arrives. The low one is aborted in the engine and queued again: its client sees one whole
    answer, later, and no error; the high one starts first."""
    before = stats(gateway)["priorities"]["low"]["preempted"]
    prompt = " ".join(random.choice(WORDS) for _ in range(1500))
    low_body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=gateway, timeout=120) as http:
        low = asyncio.create_task(stream_chunks(http, low_body, "low"))
        # Live state, read at once: the high request must arrive while the low one is in its prefill.
        await until(lambda: stats(gateway, settle=False)["router"]["in_flight"] == 1)
        high_first, _ = await stream_chunks(http, SHORT, "high")
        low_first, low_events = await low
    assert high_first < low_first, "the high request ran while the low one waited"
    assert not any("error" in event for event in low_events)
    assert len({event["id"] for event in low_events}) == 1, "every chunk comes from one engine request"
    assert sum(1 for e in low_events for c in e["choices"] if c["delta"].get("role")) == 1, "one answer, once"
    assert low_events[-1]["usage"]["completion_tokens"] == 8
    after = stats(
        gateway, until=lambda s: s["priorities"]["low"]["preempted"] - before == 1 and s["router"]["in_flight"] == 0
    )
    assert after["priorities"]["low"]["preempted"] - before == 1
    assert after["router"]["preempt_asks_low"] >= 1
    assert after["router"]["in_flight"] == 0
