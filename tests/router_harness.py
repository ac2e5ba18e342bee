"""The test harness of the Router without vLLM: the real Router, HTTP surface and Admission actor, in this
process, in front of fake LLM replicas (an in-process aiohttp server each) that fail in the ways engines fail.
Used by tests/test_router.py, tests/test_tracing.py and tests/test_access_log.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web
from conftest import serve_in_process

from serve_app.config import AdmissionConfig, AppArgs, QueueConfig
from serve_app.deployments.admission import AdmissionActor
from serve_app.deployments.admission_client import AdmissionClient
from serve_app.deployments.metrics import Metrics
from serve_app.deployments.router import Router
from serve_app.http import server as http_server

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
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's, as the replica got them
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
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
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


@contextlib.asynccontextmanager
async def open_gateway(**overrides: Any) -> AsyncIterator[Gateway]:
    """The Router with its HTTP surface, an Admission actor and Metrics, in this process; `overrides` are AppArgs
    sections that replace the harness's own. On exit, checks that nothing is left in flight or queued."""
    actor = AdmissionActor(
        QueueConfig(), AdmissionConfig(adaptive_limit=False, shed_on_predicted_wait=False), replica_check_s=3600
    )
    metrics = Metrics()
    args = AppArgs.model_validate(
        {
            "http": {"port": 0, "max_body_bytes": 2048},
            "metrics_flush_s": 3600,
            "admission": {"preempt_window_s": 600},  # no stall of a busy machine makes a victim too old
            **overrides,
        }
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
        await wait_until(lambda: not router._flights and not router.admission.reports)
        await wait_until_async(lambda: actor.state(), lambda s: s["in_flight"] == 0)  # releases go in batches
        state = await actor.state()
        assert [state[f"queued_{c}"] for c in ("high", "medium", "low")] == [0, 0, 0]
        # Also on replicas that left (a failed one's slots no longer count in `in_flight`): no slot, waiter or
        # charge is left for any request id, and no release is still on its way.
        await wait_until(lambda: not router.admission._releases and not router.admission._releasing)
        assert (actor._slots, actor._waiting, actor._released_early, actor._tenants) == ({}, {}, set(), {})
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
