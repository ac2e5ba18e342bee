"""Chaos on the real gateway: the engine process dies (as in a CUDA fault) while requests run and wait.

Every client must get a whole answer or a clear error (an HTTP error in OpenAI's JSON, or a stream
that ends with an error event and [DONE]); nothing hangs; /health goes to 503 and back to 200 once
Ray Serve has restarted the replica; and the gateway's counters add up to what was sent.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import psutil
import pytest
from conftest import MODEL_ID, stats

pytestmark = [pytest.mark.engine, pytest.mark.destructive]

BODY = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
    "max_tokens": 400,
    "ignore_eos": True,
    "stream": True,
}


def engine_cores() -> list[psutil.Process]:
    """The engine-core processes under the suite's LLMServer replica (app 'gateway')."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "ServeReplica:gateway:LLMServer" in " ".join(proc.info["cmdline"] or []):
            found += [p for p in proc.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() or [p.name()])]
    return found


async def one_stream(http: httpx.AsyncClient) -> str:
    """'complete', 'http <status>' or 'stream error'; raises if the answer is neither whole nor a clear error."""
    async with http.stream("POST", "/v1/chat/completions", json=BODY, headers={"X-Priority": "medium"}) as response:
        if response.status_code != 200:
            body = json.loads(await response.aread())
            assert body["error"]["message"], "an error says what happened"
            if response.status_code in (429, 503):
                assert int(response.headers["retry-after"]) >= 1
            return f"http {response.status_code}"
        events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", "every stream ends with [DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if any("error" in c for c in chunks):
        assert "error" in chunks[-1], "an error event is the last one"
        return "stream error"
    assert len({c["id"] for c in chunks}) == 1, "one engine request, never a repeat"
    return "complete"


async def test_engine_death_mid_stream_ends_every_request_clearly_and_the_replica_comes_back(gateway):
    before = stats(gateway)["priorities"]["medium"]
    sent = 9
    async with httpx.AsyncClient(base_url=gateway, timeout=httpx.Timeout(300, connect=10)) as http:
        clients = [
            asyncio.create_task(one_stream(http)) for _ in range(sent)
        ]  # 1 slot: 1 runs, 8 wait (medium's bound)
        await asyncio.sleep(3)
        cores = engine_cores()
        assert cores, "found the engine process"
        for core in cores:
            core.send_signal(signal.SIGKILL)
        saw_503 = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not saw_503:
            saw_503 = (await http.get("/health")).status_code == 503
            await asyncio.sleep(0.2)
        assert saw_503, "/health reports that no replica can serve"
        outcomes = await asyncio.wait_for(asyncio.gather(*clients), timeout=400)
        deadline = time.monotonic() + 600  # Ray Serve restarts the replica: a fresh engine start, as at READY_TIMEOUT_S
        while (await http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "the replica did not come back"
            await asyncio.sleep(1)
        answer = await http.post("/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4})
        assert answer.status_code == 200, "serving again after the restart"
    print("\noutcomes:", {o: outcomes.count(o) for o in set(outcomes)})
    assert "stream error" in outcomes or any(o.startswith("http 5") for o in outcomes), "the fault was seen"

    def ended(now: dict) -> int:
        return sum(now["priorities"]["medium"][k] - before[k] for k in ("completed", "rejected", "cancelled", "error"))

    def idle(now: dict) -> bool:
        return now["router"]["in_flight"] == 0 and now["router"]["queued_medium"] == 0

    after = stats(gateway, until=lambda now: ended(now) == sent + 1 and idle(now))
    assert ended(after) == sent + 1, "every request ended counted, the check request included"
    assert after["router"]["in_flight"] == 0 and after["router"]["queued_medium"] == 0
