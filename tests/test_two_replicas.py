"""A second application with two LLM replicas, beside the suite's: routing by cached prefix, no queueing
below capacity, a retry goes to the other replica, and a deleted application lets its running streams finish.

- Requests that share a long system prompt land on one replica: vLLM's own prefix-cache counters show
  every one of them queried on that engine and found cached there, none on the other.
- Long prompts at a load the engines can run at once are never held in the gateway's queue.

- One replica's engine is killed; requests sent right after all complete, those that met the dead
  engine sent once more, to the replica that lives.
- The application is deleted while two streams are in the middle of their answers. Its Router
  stops accepting connections, its LLM replicas take nothing new, and both streams still end
  whole, with every token and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import httpx
import psutil
import pytest
from conftest import MODEL_ID, delete_app, stats, wait_until_ready

from serve_app.bench.workload import tagged_text, words
from serve_app.engine import engine_metrics

pytestmark = pytest.mark.engine

PORT = 8324
APP = "pair"
URL = f"http://127.0.0.1:{PORT}"
TOKENS = 400  # tens of seconds of generation on a busy CPU: still running when the app is deleted
BODY = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": TOKENS,
    "ignore_eos": True,
    "stream": True,
    "stream_options": {"include_usage": True},
}


@pytest.fixture(scope="module")
def pair(gateway):
    from ray import serve

    from serve_app.app import build_app

    args = {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 4},
            "autoscaling": {
                "min_replicas": 2,
                "max_replicas": 2,
                "target_ongoing_requests": 2,
                "max_ongoing_requests": 4,
            },
        },
        "admission": {"reserved": {"high": 0}},  # every slot open to medium: 8 run at once
        "queue": {"medium": {"max_wait_s": 900}},  # after the kill, one slow CPU replica serves all
        "http": {"host": "127.0.0.1", "port": PORT},
        "metrics_flush_s": 0.2,
        "drain_timeout_s": 300,  # this machine may generate as slowly as 6 tokens/s per stream
    }
    started = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    wait_until_ready(URL, started)
    while stats(URL)["router"]["replicas"] < 2:  # /health is ready with the first
        time.sleep(1)
    yield URL
    if APP in serve.status().applications:
        delete_app(APP)


def engine_cores_by_replica() -> list[list[psutil.Process]]:
    """Each LLMServer replica's vLLM engine-core processes, in this app."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"ServeReplica:{APP}:LLMServer" in " ".join(proc.info["cmdline"] or []):
            found.append(
                [p for p in proc.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() or [p.name()])]
            )
    return found


def engine_prefix_counters(base_url: str) -> dict[str, tuple[float, float]]:
    """Each engine's (prefix-cache hits, queries) in tokens, from vLLM's own /metrics: the engines are found
    through the gateway's /metrics/targets, their figures are vLLM's, not the gateway's bookkeeping."""
    groups = httpx.get(f"{base_url}/metrics/targets", timeout=10).json()
    counters = {}
    for target in [t for group in groups for t in group["targets"]]:
        figures = engine_metrics.parse(httpx.get(f"http://{target}/metrics", timeout=10).text)
        counters[target] = (figures.prefix_cache_hits or 0.0, figures.prefix_cache_queries or 0.0)
    return counters


async def test_requests_sharing_a_long_prefix_land_on_one_replica(pair):
    rng = random.Random(7)
    system = tagged_text("You answer for the billing team. Their handbook follows:", 1200, rng)

    def body(i: int) -> dict:
        question = f"Question {i}: {words(rng, 20)}?"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return {"model": MODEL_ID, "messages": messages, "max_tokens": 4}

    before = engine_prefix_counters(pair)
    assert len(before) == 2, before
    async with httpx.AsyncClient(base_url=pair, timeout=httpx.Timeout(600, connect=10)) as http:
        first = await http.post("/v1/chat/completions", json=body(0))
        assert first.status_code == 200, first.text[:300]
        # Four at once (the warm replica's four slots): all should follow the first.
        rest = await asyncio.gather(*(http.post("/v1/chat/completions", json=body(i)) for i in range(1, 5)))
    assert [r.status_code for r in rest] == [200] * 4, [r.text[:200] for r in rest]
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 1000

    def settled() -> dict[str, tuple[float, float]]:
        """The counters once every query is in them (vLLM counts at each engine step)."""
        deadline = time.monotonic() + 30
        while True:
            now = engine_prefix_counters(pair)
            queried = sum(now[t][1] - before[t][1] for t in before)
            if queried >= 5 * prompt_tokens or time.monotonic() > deadline:
                return now
            time.sleep(0.5)

    after = settled()
    hits = {t: after[t][0] - before[t][0] for t in before}
    queries = {t: after[t][1] - before[t][1] for t in before}
    warm = max(queries, key=queries.__getitem__)
    cold = next(t for t in queries if t != warm)
    print("\nprefix-cache hits / queries per engine:", {t: (hits[t], queries[t]) for t in before})
    assert queries[warm] >= 5 * prompt_tokens * 0.95, "all five prompts were prefilled on one engine"
    assert queries[cold] < prompt_tokens * 0.5, "none went to the other engine"
    assert hits[warm] >= 4 * 1000, "the four that followed found the shared prefix in that engine's cache"


async def test_a_long_prompt_load_below_capacity_is_never_queued(pair):
    """Six clients on eight slots (two engines of four sequences each), prompts of about 1,000 tokens: the
    engines can run them all at once, so the gateway holds none back. The per-token knee that came before
    read long prefills as a slow engine and queued them."""
    rng = random.Random(11)
    waits: list[float] = []

    async def client(http: httpx.AsyncClient, c: int) -> None:
        for i in range(2):
            content = tagged_text(f"client {c} request {i}:", 1000, rng)
            body = {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 16,
                "ignore_eos": True,
            }
            response = await http.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text[:300]
            waits.append(float(response.headers["x-queue-wait-ms"]))

    async with httpx.AsyncClient(base_url=pair, timeout=httpx.Timeout(600, connect=10)) as http:
        await asyncio.gather(*(client(http, c) for c in range(6)))
    assert waits == [0.0] * 12, f"queued in the gateway (ms): {waits}"
    router = stats(pair, settle=False)["router"]
    assert router["pending_prefill_tokens"] == 0 and router["in_flight"] == 0, router


async def one_stream(http: httpx.AsyncClient, body: dict, first: asyncio.Event | None = None) -> str:
    """'complete' or 'stream error'; raises if the answer is neither whole nor a clear error, or repeats.
    Sets `first` at the first token."""
    events = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, (await response.aread())[:300]
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if first is not None and '"content"' in line:
                    first.set()
    assert events and events[-1] == "[DONE]", "every stream ends with [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks if "id" in c}) <= 1, "one engine request, never a repeat"
    if any("error" in c for c in chunks):
        assert "error" in chunks[-1] and chunks[-1]["error"]["message"], "a clear error event comes last"
        return "stream error"
    assert chunks[-1]["usage"]["completion_tokens"] == body["max_tokens"]
    return "complete"


async def test_an_engine_killed_mid_stream_costs_only_its_own_streams(pair):
    """8 streams run (4 per replica) and 8 wait; one engine dies. Its streams end with an error event;
    everything else, and requests sent right after, is answered whole by the replica that lives."""
    before = stats(pair)["priorities"]["medium"]
    replicas = engine_cores_by_replica()
    assert len(replicas) == 2 and all(replicas), "two replicas, each with its engine"
    streams = {**BODY, "max_tokens": 200}
    short = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=pair, timeout=httpx.Timeout(600, connect=10)) as http:
        firsts = [asyncio.Event() for _ in range(16)]
        running = [asyncio.create_task(one_stream(http, streams, first)) for first in firsts]
        deadline = time.monotonic() + 300
        while sum(f.is_set() for f in firsts) < 8:  # the 8 running ones are mid-stream
            assert time.monotonic() < deadline, f"8 running and 8 queued: {stats(pair)['router']}"
            await asyncio.sleep(0.2)
        # In a thread: the streams read on meanwhile.
        full = await asyncio.to_thread(
            stats, pair, lambda s: (s["router"]["in_flight"], s["router"]["queued_medium"]) == (8, 8)
        )
        router = full["router"]
        assert router["in_flight"] == 8 and router["queued_medium"] == 8, router
        for core in replicas[0]:
            core.send_signal(signal.SIGKILL)
        answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=short) for _ in range(8)))
        outcomes = await asyncio.wait_for(asyncio.gather(*running), 600)
    tally = {o: outcomes.count(o) for o in set(outcomes)}
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:200] for a in answers if a.status_code != 200]
    assert all(a.json()["usage"]["completion_tokens"] == 8 for a in answers)

    def ended(now: dict) -> int:
        return sum(now["priorities"]["medium"][k] - before[k] for k in ("completed", "rejected", "cancelled", "error"))

    def idle(now: dict) -> bool:
        return now["router"]["in_flight"] == 0 and now["router"]["queued_medium"] == 0

    after = stats(pair, until=lambda now: ended(now) == 16 + 8 and idle(now))
    medium = after["priorities"]["medium"]
    print("\nstreams:", tally, "retried:", medium["retried"] - before["retried"], medium["errors_by_kind"])
    assert 1 <= tally.get("stream error", 0) <= 4, "only streams that had started on the dead engine fail"
    assert tally.get("complete", 0) >= 12
    assert ended(after) == 16 + 8, "every request ended counted"
    assert medium["error"] - before["error"] == tally.get("stream error", 0)
    assert after["router"]["in_flight"] == 0 and after["router"]["queued_medium"] == 0


async def whole_stream(http: httpx.AsyncClient, started: asyncio.Event) -> dict:
    """Reads one stream to its end; sets `started` at its first token. Returns the usage event."""
    events = []
    async with http.stream("POST", "/v1/chat/completions", json=BODY) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                started.set()
                events.append(line[6:])
    assert events[-1] == "[DONE]", "the stream ended whole"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks[-1]
    return chunks[-1]["usage"]


async def test_deleting_the_app_lets_running_streams_finish_then_closes_the_port(pair):
    from ray import serve

    async with httpx.AsyncClient(base_url=pair, timeout=httpx.Timeout(300, connect=10)) as http:
        starts = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.create_task(whole_stream(http, s)) for s in starts]
        for started in starts:
            await asyncio.wait_for(started.wait(), 120)
        serve.delete(APP, _blocking=False)
        await asyncio.wait_for(until_refused(), 120)
        assert not any(s.done() for s in streams), "new connections were refused while the streams ran on"
        usages = await asyncio.gather(*streams)
    deadline = time.monotonic() + 400
    while APP in serve.status().applications:
        assert time.monotonic() < deadline, "the application was not deleted"
        await asyncio.sleep(1)
    assert [u["completion_tokens"] for u in usages] == [TOKENS, TOKENS], "every token arrived"


async def until_refused() -> None:
    """Until a new connection is refused: the Router has stopped accepting."""
    while True:
        try:
            async with httpx.AsyncClient(timeout=5) as fresh:
                await fresh.get(f"{URL}/health")
        except httpx.ConnectError:
            return
        except httpx.TransportError:  # a connection cut as the listener closed: look again
            pass
        await asyncio.sleep(0.2)
