"""The Router's branches without vLLM: the real Router, HTTP surface and Admission actor, in this process,
in front of fake LLM replicas (an in-process aiohttp server each) that fail in the ways engines fail.

Every test ends with nothing in flight or queued, in the Router and in Admission (`gateway` fixture).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web
from conftest import serve_in_process

from serve_app.config import AdmissionConfig, AppArgs, QueueConfig
from serve_app.deployments.admission import AdmissionActor
from serve_app.deployments.admission_client import AdmissionClient
from serve_app.deployments.metrics import Metrics
from serve_app.deployments.router import Router
from serve_app.http import server as http_server

# The fixture's servers run on the session's loop (pytest's asyncio_default_fixture_loop_scope), so the tests do too.
pytestmark = pytest.mark.asyncio(loop_scope="session")

TOKENS = 5
CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": TOKENS}


def event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()  # compact, as vLLM writes it


@dataclass
class FakeReplica:
    """An LLM replica: `ok`; `dead` (500 to everything, and /health fails); or `error_event` (a stream that
    starts with the engine's error event, and /health fails). Prompts may ask for SLOW (the first stream of
    that prompt sends nothing until the Router hangs up) or CUT (the stream breaks after its first chunk)."""

    mode: str = "ok"
    cut: asyncio.Event = field(default_factory=asyncio.Event)  # a CUT stream breaks when this is set
    bodies: list[dict[str, Any]] = field(default_factory=list)
    slowed: set[str] = field(default_factory=set)
    runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> FakeReplica:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        self.runner, self.url = await serve_in_process(app)
        return self

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.mode == "ok" else 503)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body.get("prompt") or body["messages"][-1]["content"]
        if self.mode == "dead":
            return web.json_response({"error": {"message": "the engine died", "code": 500}}, status=500)
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "ok"}], "usage": {"completion_tokens": TOKENS}})
        response = web.StreamResponse()
        response.content_type = "text/event-stream"
        await response.prepare(request)
        if self.mode == "error_event":
            await response.write(event({"error": {"message": "the engine died", "code": 500}}) + b"data: [DONE]\n\n")
            return response
        if "SLOW" in prompt and prompt not in self.slowed:
            self.slowed.add(prompt)
            deadline = time.monotonic() + 30
            while request.transport is not None and not request.transport.is_closing():
                assert time.monotonic() < deadline, "the Router never hung up"
                await asyncio.sleep(0.01)
            return response
        for i in range(TOKENS):
            await response.write(event({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}))
            if "CUT" in prompt:  # once the client has the first chunk: a break after bytes went out
                await asyncio.wait_for(self.cut.wait(), 30)
                assert request.transport is not None
                request.transport.close()
                return response
        await response.write(event({"choices": [], "usage": {"completion_tokens": TOKENS}}))
        await response.write(b"data: [DONE]\n\n")
        return response


class Remote:
    """What a deployment handle's method looks like to the Router: `.remote(...)`, awaited."""

    def __init__(self, fn: Any) -> None:
        self.remote = fn


class Gateway:
    """The Router on a port of its own, its Admission actor, and the fake replicas and records of a test."""

    def __init__(self, actor: AdmissionActor, router: Router, url: str) -> None:
        self.actor, self.router, self.url = actor, router, url
        self.records: list[dict[str, Any]] = []
        self.replicas: list[FakeReplica] = []

    async def replica(self, mode: str = "ok", slots: int = 4) -> FakeReplica:
        fake = await FakeReplica(mode).start()
        self.replicas.append(fake)
        await self.actor.register_replica(fake.url, fake.url, slots)
        return fake

    async def finished(self) -> list[dict[str, Any]]:
        """What the Router reported to Metrics, every request so far."""
        await self.router.reporter.flush()
        return self.records


@pytest.fixture
async def gateway():
    actor = AdmissionActor(
        QueueConfig(), AdmissionConfig(adaptive_limit=False, shed_on_predicted_wait=False), replica_check_s=3600
    )
    metrics = Metrics()
    args = AppArgs.model_validate(
        {"http": {"port": 0, "max_body_bytes": 2048}, "metrics_flush_s": 3600, "admission": {"preempt_window_s": 5}}
    )

    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    async def record(records: list[dict[str, Any]]) -> int:
        gateway.records.extend(records)
        return await metrics.record(records)

    llm = type("LLMHandle", (), {"models": Remote(list_models)})
    handles = {"record": Remote(record), "summary": Remote(metrics.summary), "prometheus": Remote(metrics.prometheus)}
    router = Router(AdmissionClient.in_process(actor), llm, type("MetricsHandle", (), handles), args)
    sock = http_server.bind("127.0.0.1", 0)
    server = await http_server.start(router.http, sock)
    gateway = Gateway(actor, router, f"http://127.0.0.1:{sock.getsockname()[1]}")
    try:
        yield gateway
        # Nothing left pending: no request in flight in the Router, no slot held or waiter queued in Admission.
        await wait_until(lambda: not router._flights and not router._reports)
        await wait_until_async(lambda: actor.state(), lambda s: s["in_flight"] == 0)  # releases go in batches
        state = await actor.state()
        assert [state[f"queued_{c}"] for c in ("high", "medium", "low")] == [0, 0, 0]
    finally:
        await http_server.drain(server, 5)
        await router.close()
        for fake in gateway.replicas:
            await fake.runner.cleanup()
        if actor._checker is not None:
            actor._checker.cancel()


async def wait_until(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


async def wait_until_async(read: Any, predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(value := await read()):
        assert time.monotonic() < deadline, f"not reached in time: {value}"
        await asyncio.sleep(0.01)


def sse(text: str) -> list[Any]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: ") and e != "data: [DONE]"]


async def post(gateway: Gateway, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        return await client.post("/v1/chat/completions", json=body, headers=headers)


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
    await gateway.actor.register_replica("gone", "http://127.0.0.1:9", 4)  # the discard port: refused
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
    await gateway.actor.register_replica("gone1", "http://127.0.0.1:9", 4)
    await gateway.actor.register_replica("gone2", "http://127.0.0.1:9/", 4)
    response = await post(gateway, CHAT)
    assert response.status_code == 503 and "retry-after" in response.headers
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"]) == ("error", "engine_unreachable")


# ---- once a byte is out -------------------------------------------------------------------------


async def test_a_stream_cut_after_its_first_byte_ends_with_an_error_event_and_is_not_retried(gateway):
    fake = await gateway.replica()
    await gateway.replica()
    body = {**CHAT, "messages": [{"role": "user", "content": "CUT"}], "stream": True}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            chunks = response.aiter_bytes()
            text = (await anext(chunks)).decode()
            fake.cut.set()
            text += "".join([chunk.decode() async for chunk in chunks])
    events = sse(text)
    assert events[0]["choices"][0]["delta"]["content"] == "t0 "
    assert events[-1]["error"]["code"] == 502 and text.endswith("data: [DONE]\n\n")
    assert len(fake.bodies) == 1
    [record] = await gateway.finished()
    assert (record["outcome"], record["kind"], record["retried"]) == ("error", "engine_error", False)


# ---- preemption ---------------------------------------------------------------------------------


async def test_a_waiting_high_request_preempts_a_low_stream_that_has_sent_nothing_and_it_starts_over(gateway):
    fake = await gateway.replica(slots=1)
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    low = asyncio.ensure_future(post(gateway, slow, **{"X-Priority": "low"}))
    await wait_until(lambda: len(fake.bodies) == 1)  # the low stream holds the only slot, silent
    high = await post(gateway, {**CHAT, "stream": True}, **{"X-Priority": "high"})
    assert high.status_code == 200 and len(sse(high.text)) == TOKENS
    low_answer = await low
    assert len(sse(low_answer.text)) == TOKENS, "the low stream started over and its client saw one answer"
    assert [b["priority"] for b in fake.bodies] == [2, 0, 2]
    records = {r["priority"]: r for r in await gateway.finished()}
    assert records["low"]["outcome"] == "completed" and records["low"]["preemptions"] == 1
    assert records["low"]["retried"] is False
    assert (await gateway.actor.state())["preempt_asks_low"] == 1


# ---- clients that leave -------------------------------------------------------------------------


async def test_a_client_that_leaves_while_queued_is_counted_and_leaves_the_queue(gateway):
    fake = await gateway.replica(slots=1)
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    holder = asyncio.ensure_future(post(gateway, slow, **{"X-Priority": "high"}))  # high: never preempted
    await wait_until(lambda: len(fake.bodies) == 1)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=httpx.Timeout(30, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=CHAT)
    await wait_until(lambda: gateway.router.reporter._pending)
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
        assert (await client.get("/health")).json()["capacity"] == 4


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
