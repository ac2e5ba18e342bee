"""The Router's branches without vLLM: the real Router, HTTP surface and Admission actor, in this process,
in front of fake LLM replicas (an in-process aiohttp server each) that fail in the ways engines fail
(tests/router_harness.py).

Every test ends with nothing in flight or queued, in the Router and in Admission (`gateway` fixture).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import free_port
from router_harness import CHAT, TOKENS, open_gateway, post, sse, wait_until, wait_until_async

# The fixture's servers run on the session's loop (pytest's asyncio_default_fixture_loop_scope), so the tests do too.
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture
async def gateway():
    async with open_gateway() as gateway:
        yield gateway


# ---- the answer, relayed --------------------------------------------------------------------------


async def test_a_stream_is_relayed_whole_and_the_usage_it_did_not_ask_for_is_dropped_but_counted(gateway):
    fake = await gateway.replica()
    response = await post(gateway, {**CHAT, "stream": True}, **{"X-Priority": "high"})
    assert response.status_code == 200 and response.headers["x-priority"] == "high"
    events = sse(response.text)
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "t0 t1 t2 t3 t4 "
    assert fake.bodies[0]["stream_options"] == {"include_usage": True} and fake.bodies[0]["priority"] == 0
    [record] = await gateway.finished()
    assert (record["outcome"], record["output_tokens"], record["retried"]) == ("completed", TOKENS, False)


async def test_a_stream_that_asked_for_usage_keeps_it(gateway):
    await gateway.replica()
    response = await post(gateway, {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert sse(response.text)[-1]["usage"] == {"completion_tokens": TOKENS}


async def test_a_whole_answer_is_passed_through_and_its_tokens_counted(gateway):
    await gateway.replica()
    response = await post(gateway, CHAT)
    assert response.json()["usage"] == {"completion_tokens": TOKENS}
    [record] = await gateway.finished()
    assert (record["outcome"], record["output_tokens"]) == ("completed", TOKENS)


# ---- failures before the first byte: one retry, elsewhere ---------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_5xx_before_the_first_byte_is_retried_once_on_another_replica(gateway, stream):
    dead = await gateway.replica("dead")
    await gateway.replica()
    response = await post(gateway, {**CHAT, "stream": stream})
    assert response.status_code == 200, response.text
    assert len(dead.bodies) == 1
    assert (await gateway.actor.state())["replicas"] == 1, "the failed replica left dispatch"
    [record] = await gateway.finished()
    assert (record["outcome"], record["retried"]) == ("completed", True)


async def test_an_error_event_before_the_first_byte_is_retried_and_the_client_never_sees_it(gateway):
    await gateway.replica("error_event")
    await gateway.replica()
    response = await post(gateway, {**CHAT, "stream": True})
    assert "error" not in response.text
    assert len(sse(response.text)) == TOKENS
    [record] = await gateway.finished()
    assert (record["outcome"], record["retried"]) == ("completed", True)


async def test_an_unreachable_replica_is_retried_on_another(gateway):
    await gateway.actor.register_replica("gone", f"http://127.0.0.1:{free_port()}", 4)  # nothing listens: refused
    await gateway.replica()
    response = await post(gateway, CHAT)
    assert response.status_code == 200
    [record] = await gateway.finished()
    assert (record["outcome"], record["retried"]) == ("completed", True)


async def test_a_second_failure_is_not_retried_and_the_engines_error_is_passed_through(gateway):
    first, second = await gateway.replica("dead"), await gateway.replica("dead")
    response = await post(gateway, CHAT)
    assert response.status_code == 500 and response.json()["error"]["message"] == "the engine died"
    assert len(first.bodies) + len(second.bodies) == 2
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"], record["retried"]) == ("error", "engine_error", True)


async def test_no_reachable_replica_is_a_503_with_retry_after(gateway):
    await gateway.actor.register_replica("gone1", f"http://127.0.0.1:{free_port()}", 4)
    await gateway.actor.register_replica("gone2", f"http://127.0.0.1:{free_port()}", 4)
    response = await post(gateway, CHAT)
    assert response.status_code == 503 and "retry-after" in response.headers
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"]) == ("error", "engine_unreachable")


# ---- once a byte is out -------------------------------------------------------------------------


async def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event_and_is_not_retried(gateway):
    fakes = [await gateway.replica(), await gateway.replica()]
    body = {**CHAT, "messages": [{"role": "user", "content": "CUT"}], "stream": True}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = response.aiter_bytes()
            text = (await anext(chunks)).decode()
            for fake in fakes:
                fake.cut.set()
            text += "".join([chunk.decode() async for chunk in chunks])
    events = sse(text)
    assert events[0]["choices"][0]["delta"]["content"] == "t0 "
    assert events[-1]["error"]["code"] == 502 and text.endswith("data: [DONE]\n\n")
    assert sum(len(fake.bodies) for fake in fakes) == 1
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"], record["retried"]) == ("error", "engine_error", False)


# ---- preemption ---------------------------------------------------------------------------------


async def test_a_waiting_high_request_preempts_a_low_stream_that_has_sent_nothing_and_it_starts_over(gateway):
    fake = await gateway.replica(slots=1)
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    low = asyncio.ensure_future(post(gateway, slow, **{"X-Priority": "low"}))
    await wait_until(lambda: len(fake.bodies) == 1)  # the low stream holds the only slot, silent
    # High's reserve (one slot before its demand is measured) is on top of the replica's slots: a first high
    # request goes to the engine at once, with no preemption; it holds that slot, silent, until its client leaves.
    held = {**CHAT, "messages": [{"role": "user", "content": "SLOW too"}], "stream": True}
    holder = asyncio.ensure_future(post(gateway, held, **{"X-Priority": "high"}))
    await wait_until(lambda: len(fake.bodies) == 2)
    assert (await gateway.actor.state())["preempt_asks_low"] == 0
    high = await post(gateway, {**CHAT, "stream": True}, **{"X-Priority": "high"})
    assert high.status_code == 200 and len(sse(high.text)) == TOKENS
    holder.cancel()  # the high holder's client leaves: the slot it held is the low's again
    await asyncio.gather(holder, return_exceptions=True)
    low_answer = await low
    assert len(sse(low_answer.text)) == TOKENS, "the low stream started over and its client saw one answer"
    assert [b["priority"] for b in fake.bodies] == [2, 0, 0, 2]
    await wait_until_async(gateway.finished, lambda records: len(records) == 3)
    records = {r["priority"]: r for r in gateway.records if r["priority"] == "low"}
    assert records["low"]["outcome"] == "completed" and records["low"]["preemptions"] == 1
    assert records["low"]["retried"] is False
    assert (await gateway.actor.state())["preempt_asks_low"] == 1


# ---- clients that leave -------------------------------------------------------------------------


async def test_a_client_that_leaves_while_queued_is_counted_and_leaves_the_queue(gateway):
    fake = await gateway.replica(slots=1)
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    holder = asyncio.ensure_future(post(gateway, slow, **{"X-Priority": "high"}))  # high: never preempted
    await wait_until(lambda: len(fake.bodies) == 1)
    waiting = asyncio.ensure_future(post(gateway, CHAT))
    await wait_until_async(gateway.actor.state, lambda state: state["queued_medium"] == 1)
    waiting.cancel()  # the client hangs up while its request waits for the only slot
    await asyncio.gather(waiting, return_exceptions=True)
    await wait_until_async(gateway.finished, lambda records: len(records) == 1)
    assert (await gateway.actor.state())["queued_medium"] == 0
    [gone] = await gateway.finished()
    assert (gone["outcome"], gone["kind"], gone["admitted"]) == ("cancelled", "client_gone_while_queued", False)
    holder.cancel()  # the slow stream's client leaves too: the Router hangs up on the replica
    await asyncio.gather(holder, return_exceptions=True)
    await wait_until_async(gateway.finished, lambda records: len(records) == 2)
    assert gateway.records[1]["kind"] == "client_gone"


# ---- the HTTP surface ---------------------------------------------------------------------------


async def test_routes_answer_404_405_with_allow_and_accept_a_trailing_slash(gateway):
    await gateway.replica()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        wrong_method = await client.get("/v1/chat/completions")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert wrong_method.json()["error"]["type"] == "MethodNotAllowedError"
        assert (await client.post("/v1/models")).headers["allow"] == "GET, HEAD"
        assert (await client.get("/v1/nothing")).json()["error"]["code"] == 404
        assert (await client.get("/v1/models/")).json()["data"][0]["id"] == "fake"
        health = (await client.get("/health")).json()
        assert health["capacity"] == 4 and "replica_detail" not in health, "no engine address on an open path"


async def test_bad_bodies_are_4xx_that_say_what_to_fix_and_reach_no_replica(gateway):
    fake = await gateway.replica()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        too_large = await client.post("/v1/completions", content=b"{" + b" " * 4096 + b"}")
        assert too_large.status_code == 413 and "2048 bytes" in too_large.json()["error"]["message"]
        assert (await client.post("/v1/completions", content=b"{not json")).status_code == 400
        wizard = await client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "wizard"}]})
        assert wizard.json()["error"]["param"] == "messages[0].role"
        urgent = await client.post("/v1/chat/completions", json=CHAT, headers={"X-Priority": "urgent"})
        assert urgent.status_code == 400 and urgent.json()["error"]["param"] == "priority"
        surrogate = await client.post(
            "/v1/completions", content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"}
        )
        assert surrogate.status_code == 400 and "Unicode" in surrogate.json()["error"]["message"]
    assert fake.bodies == []
    assert [r["kind"] for r in await gateway.finished()] == ["bad_request"]  # only the one that had a slot


async def test_with_no_replica_health_and_generation_are_503_with_retry_after(gateway):
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.headers["retry-after"] == "5"
        answer = await client.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 503 and "still loading" in answer.json()["error"]["message"]
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"]) == ("rejected", "not_ready")


async def test_a_body_that_cannot_reach_the_engine_is_a_400_before_it_takes_a_slot(gateway):
    fake = await gateway.replica(slots=1)
    odd = {**CHAT, "enable_thinking": True, "chat_template_kwargs": "ab"}  # once took a slot and kept it
    response = await post(gateway, odd)
    assert response.status_code == 400 and response.json()["error"]["param"] == "chat_template_kwargs"
    assert (await post(gateway, CHAT)).status_code == 200, "the only slot is free"
    assert len(fake.bodies) == 1


async def test_api_keys_401_403_an_open_health_and_admin_paths():
    keys = {"sk-user": {"name": "team-a"}, "sk-admin": {"name": "ops", "admin": True}}
    async with open_gateway(auth={"keys": keys}) as gateway:
        await gateway.replica()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            assert (await client.get("/health")).status_code == 200
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 401
            user = {"Authorization": "Bearer sk-user"}
            assert (await client.post("/v1/chat/completions", json=CHAT, headers=user)).status_code == 200
            for path in ("/metrics", "/metrics/targets", "/v1/stats"):
                assert (await client.get(path, headers=user)).status_code == 403
                assert (await client.get(path, headers={"Authorization": "Bearer sk-admin"})).status_code == 200
            assert (await client.get("/v1/nothing", headers=user)).status_code == 404


async def test_a_new_queueing_forgets_a_preemption_ask_for_the_old_id():
    from serve_app.deployments.router import InFlight
    from serve_app.policy.priority import Priority

    flight = InFlight(Priority.LOW, "chat", 0.0, lambda *_: None, preempt_asked=True)
    old_id = flight.request_id
    flight.requeued(retry=True)
    assert (flight.preempt_asked, flight.retried, flight.stage.value) == (False, True, "queued")
    assert flight.request_id != old_id
