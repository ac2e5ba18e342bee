"""Traces through the real Router (tests/router_harness.py), exported over OTLP/HTTP to a receiver in this test:
which spans, under which parents, with which attributes, and the traceparent the LLM replica gets.

A span ends when its request does; the tests force-flush the Router's provider (off the event loop, which
the receiver runs on) and read what the receiver was sent.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from router_harness import CHAT, TOKENS, Gateway, open_gateway, post, sse, wait_until, wait_until_async

from serve_app.observability import access_log

pytestmark = pytest.mark.asyncio(loop_scope="session")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"


class Receiver:
    """An OTLP/HTTP collector's traces endpoint: keeps every span it is sent, and the service names."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.services: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1/traces"
        return self

    async def export(self, request: web.Request) -> web.Response:
        raw = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        message = ExportTraceServiceRequest.FromString(raw)
        for resource_spans in message.resource_spans:
            self.services.add(attributes(resource_spans.resource).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")


def attributes(span: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


def traceparent_ids(header: str) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of a W3C traceparent."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00"
    return trace_id, span_id, flags


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = await Receiver().start()
    try:
        yield receiver
    finally:
        assert receiver.runner is not None
        await receiver.runner.cleanup()


@pytest.fixture
async def traced(receiver: Receiver) -> AsyncIterator[Gateway]:
    async with open_gateway(tracing={"enabled": True, "otlp_endpoint": receiver.url}) as gateway:
        yield gateway


async def traces(gateway: Gateway, receiver: Receiver, requests: int = 1) -> dict[str, list[Span]]:
    """The spans of each trace by trace id, each trace's in start order, once `requests` root spans are in."""

    async def flushed() -> int:
        assert gateway.router.tracer is not None
        await asyncio.to_thread(gateway.router.tracer.force_flush)  # it waits on the receiver: not on the loop
        return sum(s.name == "gateway.request" for s in receiver.spans)

    await wait_until_async(flushed, lambda roots: roots >= requests)
    by_trace: dict[str, list[Span]] = {}
    for span in sorted(receiver.spans, key=lambda s: s.start_time_unix_nano):
        by_trace.setdefault(span.trace_id.hex(), []).append(span)
    return by_trace


def split(spans: list[Span]) -> tuple[Span, list[Span]]:
    """The root span and its children, checked to be one tree: every child's parent is the root."""
    [root] = [s for s in spans if s.name == "gateway.request"]
    children = [s for s in spans if s is not root]
    assert {c.parent_span_id for c in children} == {root.span_id}
    assert all(c.end_time_unix_nano >= c.start_time_unix_nano > 0 for c in spans)
    return root, children


# ---- a request's trace ---------------------------------------------------------------------------


async def test_a_request_with_a_traceparent_is_traced_under_it_and_its_replica_gets_the_trace(traced, receiver):
    fake = await traced.replica()
    headers = {"traceparent": TRACEPARENT, "X-Priority": "high"}
    response = await post(traced, {**CHAT, "stream": True}, **headers)
    assert response.status_code == 200 and len(sse(response.text)) == TOKENS

    [(trace_id, spans)] = (await traces(traced, receiver)).items()
    assert trace_id == TRACE_ID and receiver.services == {"serve-app-gateway"}
    root, children = split(spans)
    assert root.parent_span_id.hex() == CLIENT_SPAN_ID and root.kind == Span.SPAN_KIND_SERVER
    got = attributes(root)
    assert {k: got[k] for k in ("gateway.priority", "gateway.endpoint", "gen_ai.request.model")} == {
        "gateway.priority": "high",
        "gateway.endpoint": "chat",
        "gen_ai.request.model": "fake",
    }
    assert (got["gateway.outcome"], got["gateway.retried"], got["gateway.preemptions"]) == ("completed", False, 0)
    assert got["gen_ai.usage.output_tokens"] == TOKENS and "gateway.error_kind" not in got
    assert got["gateway.queue_wait_s"] >= 0 and got["gateway.ttft_s"] > 0

    admission, dispatch, relay = children
    assert [s.name for s in children] == ["gateway.admission", "gateway.dispatch", "gateway.relay"]
    assert attributes(admission)["gateway.replica"] == fake.url and attributes(admission)["gateway.queue_wait_s"] >= 0
    assert dispatch.kind == Span.SPAN_KIND_CLIENT and attributes(dispatch)["http.response.status_code"] == 200
    assert attributes(dispatch)["url.full"] == fake.url + "/v1/chat/completions"
    assert attributes(relay)["gen_ai.usage.output_tokens"] == TOKENS
    [first_byte] = relay.events
    assert first_byte.name == "first_byte" and relay.start_time_unix_nano <= first_byte.time_unix_nano
    assert root.status.code == Status.STATUS_CODE_UNSET

    # vLLM's span would join under the dispatch: the replica was sent the dispatch span's context.
    [sent] = fake.headers
    assert traceparent_ids(sent["traceparent"]) == (TRACE_ID, dispatch.span_id.hex(), "01")


async def test_a_request_without_a_traceparent_starts_a_trace_of_its_own(traced, receiver):
    fake = await traced.replica()
    response = await post(traced, CHAT)
    assert response.status_code == 200

    [(trace_id, spans)] = (await traces(traced, receiver)).items()
    root, children = split(spans)
    assert trace_id != TRACE_ID and root.parent_span_id == b""
    assert [s.name for s in children] == ["gateway.admission", "gateway.dispatch", "gateway.relay"]
    assert children[2].events == [], "a whole answer has no first byte of its own"
    assert attributes(root)["gateway.outcome"] == "completed" and "gateway.ttft_s" not in attributes(root)
    assert traceparent_ids(fake.headers[0]["traceparent"])[:2] == (trace_id, children[1].span_id.hex())


async def test_a_call_without_headers_as_through_a_deployment_handle_starts_a_trace(traced, receiver):
    fake = await traced.replica()
    router = traced.router
    flight = router.open_flight("completions", {"prompt": "hi"}, "low", None, time.monotonic())  # as _handle_call
    status, _ = await router.whole_answer(flight, await router.dispatch(flight, {"prompt": "hi"}))
    assert status == 200

    [(trace_id, spans)] = (await traces(traced, receiver)).items()
    root, children = split(spans)
    assert root.parent_span_id == b"" and len(children) == 3
    assert (attributes(root)["gateway.endpoint"], attributes(root)["gateway.priority"]) == ("completions", "low")
    assert "gen_ai.request.model" not in attributes(root)
    assert traceparent_ids(fake.headers[0]["traceparent"])[0] == trace_id


async def test_a_rejected_request_ends_its_spans_with_its_outcome(traced, receiver):
    response = await post(traced, CHAT, traceparent=TRACEPARENT)  # no replica yet: 503
    assert response.status_code == 503

    root, children = split((await traces(traced, receiver))[TRACE_ID])
    assert [s.name for s in children] == ["gateway.admission"]
    for span in (root, children[0]):
        got = attributes(span)
        assert (got["gateway.outcome"], got["gateway.error_kind"]) == ("rejected", "not_ready")
    assert attributes(root)["gateway.admitted"] is False
    assert len(receiver.spans) == 2, "each span was ended, and sent, once"


async def test_a_retry_is_a_second_admission_and_dispatch_under_the_same_root(traced, receiver):
    dead = await traced.replica("dead")
    fake = await traced.replica()
    response = await post(traced, CHAT, traceparent=TRACEPARENT)
    assert response.status_code == 200

    root, children = split((await traces(traced, receiver))[TRACE_ID])
    names = ["gateway.admission", "gateway.dispatch", "gateway.admission", "gateway.dispatch", "gateway.relay"]
    assert [s.name for s in children] == names
    failed = children[1]
    assert attributes(failed)["http.response.status_code"] == 500 and attributes(failed)["gateway.requeued"] == "retry"
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert attributes(children[2])["gateway.front"] is True
    assert attributes(root)["gateway.retried"] is True and attributes(root)["gateway.outcome"] == "completed"
    assert traceparent_ids(dead.headers[0]["traceparent"])[1] == failed.span_id.hex()
    assert traceparent_ids(fake.headers[0]["traceparent"])[1] == children[3].span_id.hex()


async def test_a_preempted_stream_queues_again_in_the_same_trace(traced, receiver):
    fake = await traced.replica(slots=1)
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    low = asyncio.ensure_future(post(traced, slow, **{"X-Priority": "low", "traceparent": TRACEPARENT}))
    await wait_until(lambda: len(fake.bodies) == 1)
    # a first high takes high's reserve on top of the one slot and holds it; the second one preempts the low
    held = {**CHAT, "messages": [{"role": "user", "content": "SLOW too"}], "stream": True}
    holder = asyncio.ensure_future(post(traced, held, **{"X-Priority": "high"}))
    await wait_until(lambda: len(fake.bodies) == 2)
    high = await post(traced, {**CHAT, "stream": True}, **{"X-Priority": "high"})
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    assert high.status_code == 200 and len(sse((await low).text)) == TOKENS

    root, children = split((await traces(traced, receiver, requests=3))[TRACE_ID])
    stages = ["gateway.admission", "gateway.dispatch", "gateway.relay"]
    assert [s.name for s in children] == stages * 2
    assert attributes(children[2])["gateway.requeued"] == "preempted"
    assert children[2].status.code == Status.STATUS_CODE_UNSET
    assert (attributes(root)["gateway.preemptions"], attributes(root)["gateway.outcome"]) == (1, "completed")


async def test_a_client_that_leaves_ends_the_spans_as_cancelled(traced, receiver):
    await traced.replica()
    slow = {**CHAT, "messages": [{"role": "user", "content": "SLOW"}], "stream": True}
    async with httpx.AsyncClient(base_url=traced.url, timeout=httpx.Timeout(30, read=0.5)) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json=slow, headers={"traceparent": TRACEPARENT})

    root, children = split((await traces(traced, receiver))[TRACE_ID])
    assert [s.name for s in children] == ["gateway.admission", "gateway.dispatch", "gateway.relay"]
    for span in (root, children[-1]):
        got = attributes(span)
        assert (got["gateway.outcome"], got["gateway.error_kind"]) == ("cancelled", "client_gone")


# ---- sampling, tracing off, and the access log's trace id ----------------------------------------


async def test_the_sample_ratio_drops_new_traces_but_a_clients_sampled_flag_is_followed(receiver):
    tracing = {"enabled": True, "otlp_endpoint": receiver.url, "sample_ratio": 0.0}
    async with open_gateway(tracing=tracing) as gateway:
        fake = await gateway.replica()
        assert (await post(gateway, CHAT)).status_code == 200
        assert (await post(gateway, CHAT, traceparent=TRACEPARENT)).status_code == 200
        assert list(await traces(gateway, receiver)) == [TRACE_ID]
        unsampled, sampled = (traceparent_ids(h["traceparent"]) for h in fake.headers)
        sampled_bits = [int(ids[2], 16) & 1 for ids in (unsampled, sampled)]  # W3C's flag 01 (02: a random id)
        assert sampled_bits == [0, 1], "vLLM is told not to record the unsampled one"


async def test_tracing_off_makes_no_spans_and_sends_no_traceparent(receiver):
    async with open_gateway(tracing={"enabled": False, "otlp_endpoint": receiver.url}) as gateway:
        fake = await gateway.replica()
        assert gateway.router.tracer is None
        response = await post(gateway, {**CHAT, "stream": True}, traceparent=TRACEPARENT)
        assert response.status_code == 200
        assert "traceparent" not in fake.headers[0]
    assert receiver.spans == []


async def test_the_access_log_line_names_the_trace(receiver):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    access_log.logger.addHandler(handler)
    try:
        tracing = {"enabled": True, "otlp_endpoint": receiver.url}
        async with open_gateway(tracing=tracing, access_log=True) as gateway:
            await gateway.replica()
            assert (await post(gateway, CHAT, traceparent=TRACEPARENT)).status_code == 200
    finally:
        access_log.logger.removeHandler(handler)
    [line] = lines
    assert json.loads(line)["trace_id"] == TRACE_ID
