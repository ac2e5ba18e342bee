"""The OpenAI API of the real gateway, through the clients users have: OpenAI SDK, LangChain, curl-like HTTP, handles."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import APP_NAME, MODEL_ID, metric_samples, sample, stats

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0)


def test_chat_non_streaming_with_openai_sdk(gateway):
    reply = client(gateway).chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=20, temperature=0)
    assert reply.model == MODEL_ID
    assert reply.choices[0].message.role == "assistant"
    assert "Paris" in reply.choices[0].message.content, "the real model answers the question"
    assert 0 < reply.usage.completion_tokens <= 20


def test_chat_streaming_with_usage_with_openai_sdk(gateway):
    stream = client(gateway).chat.completions.create(
        model=MODEL_ID,
        messages=CHAT,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # exactly 12 tokens: sampling may otherwise stop early
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, "tokens must arrive one by one"


def test_streaming_without_include_usage_sends_no_usage_chunk(gateway):
    stream = client(gateway).chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_async_openai_sdk_streaming_and_not(gateway):
    aclient = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="EMPTY", max_retries=0)
    reply = await aclient.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8)
    assert reply.choices[0].message.content
    stream = await aclient.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, stream=True)
    deltas = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(d or "" for d in deltas).strip()
    await aclient.close()


def test_completions_streaming_and_not_and_models(gateway):
    sdk = client(gateway)
    reply = sdk.completions.create(
        model=MODEL_ID, prompt="The capital of France is", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text and reply.usage.completion_tokens == 6
    chunks = list(
        sdk.completions.create(
            model=MODEL_ID,
            prompt="One, two,",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]


def test_priority_header_and_body_field_are_accepted(gateway):
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 4}
    by_header = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers={"X-Priority": "high"}, timeout=60)
    assert by_header.status_code == 200 and by_header.headers["x-priority"] == "high"
    by_body = httpx.post(f"{gateway}/v1/chat/completions", json={**body, "priority": "low"}, timeout=60)
    assert by_body.status_code == 200 and by_body.headers["x-priority"] == "low"
    default = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=60)
    assert default.headers["x-priority"] == "medium"


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"] == status
    if param is not None:
        assert error["param"] == param
    return error


def test_bad_requests_get_openai_error_json(gateway):
    url = f"{gateway}/v1/chat/completions"
    good = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 4}
    assert_openai_error(httpx.post(url, json=good, headers={"X-Priority": "urgent"}), 400, param="priority")
    assert_openai_error(httpx.post(url, json={**good, "priority": 3}), 400, param="priority")
    error = assert_openai_error(
        httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert "JSON" in error["message"]
    assert_openai_error(httpx.post(url, json=[1, 2]), 400)
    error = assert_openai_error(httpx.post(url, json={**good, "max_tokens": 100_000}, timeout=60), 400)
    assert "max_tokens" in error["message"]
    assert_openai_error(httpx.post(url, json={**good, "model": "no-such-model"}, timeout=60), 404)
    assert_openai_error(httpx.get(f"{gateway}/v1/nothing-here"), 404)
    assert_openai_error(httpx.get(url), 405)


def test_oversized_bodies_get_413_and_unknown_roles_400(gateway):
    url = f"{gateway}/v1/chat/completions"
    good = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 4}
    huge = {**good, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    error = assert_openai_error(httpx.post(url, json=huge, timeout=60), 413)
    assert "limit" in error["message"]

    def undeclared():  # chunked, no Content-Length: refused while it streams in
        for _ in range(10):
            yield b"x" * (1024 * 1024)

    assert_openai_error(
        httpx.post(url, content=undeclared(), headers={"content-type": "application/json"}, timeout=60), 413
    )
    wizard = {**good, "messages": [{"role": "wizard", "content": "hi"}]}
    assert_openai_error(httpx.post(url, json=wizard, timeout=60), 400, param="messages[0].role")
    assert httpx.post(url, json=good, timeout=60).status_code == 200, "the gateway still serves afterwards"


def test_openai_sdk_raises_typed_errors(gateway):
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client(gateway).chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=100_000)


def test_health_reports_ready_capacity(gateway):
    health = httpx.get(f"{gateway}/health").json()
    assert health["status"] == "ok" and health["replicas"] == 1 and health["capacity"] == 1


async def test_python_handle_call_streaming_and_not(gateway):
    """As another Ray app's deployment calls it: from an event loop, with `await`."""
    from ray import serve

    from serve_app.errors import GatewayError

    handle = serve.get_app_handle(APP_NAME)
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 6}
    reply = await handle.chat.remote(body, priority="high")
    assert reply["choices"][0]["message"]["content"]
    chunks = [c async for c in handle.options(stream=True).chat.remote({**body, "stream": True}, priority="low")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    completion = await handle.completions.remote({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 3})
    assert completion["usage"]["completion_tokens"] == 3
    with pytest.raises(GatewayError) as excinfo:
        await handle.chat.remote(body, priority="bogus")
    assert excinfo.value.status == 400


def test_langchain_chat_openai(gateway):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{gateway}/v1", api_key="EMPTY", model=MODEL_ID, max_tokens=8, max_retries=0)
    assert llm.invoke("Say hello.").content.strip()
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert streamed.strip()


def test_stats_and_metrics_count_per_priority(gateway):
    before = stats(gateway)["priorities"]
    body = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 3}
    for priority in ("high", "high", "low"):
        response = httpx.post(f"{gateway}/v1/chat/completions", json=body, headers={"X-Priority": priority}, timeout=60)
        assert response.status_code == 200
    bad = httpx.post(f"{gateway}/v1/chat/completions", json={**body, "model": "nope"}, headers={"X-Priority": "low"})
    assert bad.status_code == 404

    def counted(now: dict) -> bool:
        p = now["priorities"]
        return (
            p["high"]["completed"] - before["high"]["completed"] == 2
            and p["low"]["completed"] - before["low"]["completed"] == 1
            and p["low"]["error"] - before["low"]["error"] == 1
        )

    after = stats(gateway, until=counted)["priorities"]
    assert after["high"]["completed"] - before["high"]["completed"] == 2
    assert after["low"]["completed"] - before["low"]["completed"] == 1
    assert after["low"]["error"] - before["low"]["error"] == 1
    assert after["high"]["e2e_latency_seconds"]["count"] - before["high"]["e2e_latency_seconds"]["count"] == 2
    assert after["high"]["e2e_latency_seconds"]["p50"] > 0
    assert after["high"]["output_tokens"]["count"] >= 2
    samples = metric_samples(httpx.get(f"{gateway}/metrics").text)
    completed = sample(samples, "gateway_requests_total", priority="high", outcome="completed")
    assert completed == after["high"]["completed"]
    assert sample(samples, "gateway_e2e_latency_seconds_bucket", priority="low", le="+Inf") is not None
    assert sample(samples, "gateway_errors_total", priority="low", outcome="error", kind="not_found") >= 1
    assert sample(samples, "gateway_replicas") == 1
    [replica] = [labels for name, labels in samples if name == "gateway_replica_dispatched_total"]
    targets = httpx.get(f"{gateway}/metrics/targets").json()
    assert targets == [{"targets": [dict(replica)["replica"]], "labels": {}}]
    engine = metric_samples(httpx.get(f"http://{targets[0]['targets'][0]}/metrics").text)
    assert any(name == "vllm:num_requests_running" for name, _ in engine), "the target is vLLM's own server"
