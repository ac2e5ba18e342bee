"""The relay harness's engine double (scripts/fake_engine.py) streams as vLLM does, so what the harness
measures in front of it is the gateway's relay: exact token counts, vLLM's event framing and its gauges."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, wait_for_server

from serve_app.bench.load import Target, run_step
from serve_app.bench.metrics import summarize
from serve_app.bench.workload import build_requests
from serve_app.http import relay

ENGINE = Path(__file__).parents[1] / "scripts" / "fake_engine.py"


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ENGINE), "--port", str(port), "--step-ms", "5", "--stream-interval", "3"]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e]


def test_a_stream_is_framed_as_vllm_frames_it(engine):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10, "stream": True}
    body["stream_options"] = {"include_usage": True}
    text = httpx.post(f"{engine}/v1/chat/completions", json=body, timeout=10).text
    parsed = [json.loads(e) for e in events(text)[:-1]]
    assert events(text)[-1] == "[DONE]"
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"].get("content", "") for c in parsed if c["choices"]]
    assert "".join(contents) == "tok " * 10
    assert [c.count("tok") for c in contents[1:-1]] == [1, 3, 3, 3]  # the first at once, then every 3rd token
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"
    assert parsed[-1]["usage"]["completion_tokens"] == 10 and parsed[-1]["choices"] == []
    # The Router reads the count from the usage event and drops the event for a client that did not ask for it.
    relayed, tokens = relay.take_usage(text.encode(), keep=False)
    assert tokens == 10 and b'"usage"' not in relayed and relayed.endswith(b"data: [DONE]\n\n")


def test_the_bench_client_counts_every_token_and_the_gauges_return_to_zero(engine):
    specs = build_requests(12, ["hello"], 16, {}, seed=0)
    run = run_step(Target(engine, "fake-model", ignore_eos=True), "async", specs, concurrency=6)
    s = summarize(run.results, run.duration_s, {})
    assert s["outcomes"]["ok"] == 12 and s["total_output_tokens"] == 12 * 16
    answer = httpx.post(f"{engine}/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 4}, timeout=10)
    assert answer.json()["choices"][0]["text"] == "tok " * 4 and answer.json()["usage"]["completion_tokens"] == 4
    gauges = httpx.get(f"{engine}/metrics", timeout=5).text
    assert 'vllm:num_requests_running{model_name="fake-model"} 0' in gauges
