"""A disconnect storm on the real gateway: 1,000 clients that hang up at random moments.

Each client speaks raw HTTP/1.1 on its own socket, so that it can hang up exactly when it chooses:
while its request waits in the queue, when the response headers come, at the first token, or in
the middle of the stream; some close politely (FIN), some reset the connection (RST). Afterwards
nothing may be left behind: no slot in use, empty queues, no request in the engine, and counters
that add up to what was sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import struct
import time
from collections import Counter
from urllib.parse import urlsplit

import pytest
from conftest import APP_NAME, MODEL_ID, stats

pytestmark = pytest.mark.engine

CLIENTS = 1000
AT_ONCE = 10  # the suite's gateway runs one request at a time and queues 8 high, 8 medium, 3 low
MOMENTS = ("queued", "headers", "first_token", "mid_stream", "whole_answer_wait")
CLASSES = ("high", "medium", "low")
CONTENT_LENGTH = re.compile(rb"(?i)content-length:\s*(\d+)")


def body(stream: bool, rng: random.Random) -> bytes:
    words = " ".join(rng.choice(("tell", "me", "a", "story", "about", "the", "sea")) for _ in range(rng.randint(1, 40)))
    return json.dumps(
        {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": words}],
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()


async def one_client(host: str, port: int, moment: str, rng: random.Random) -> str:
    """Sends one request and hangs up at `moment`; returns what the client saw before it did."""
    payload = body(moment != "whole_answer_wait", rng)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nX-Priority: {rng.choice(CLASSES + ('high', 'medium'))}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    received = b""
    seen = "nothing"
    try:
        writer.write(head + payload)
        await writer.drain()
        # From 0.3 s: a reset before the gateway has read the request would leave nothing to count.
        deadline = time.monotonic() + (rng.uniform(0.3, 1.5) if moment in ("queued", "whole_answer_wait") else 300)
        while True:
            if b"\r\n\r\n" in received:
                status = int(received.split(b" ", 2)[1])
                if status != 200:
                    return f"http {status}"
                seen = "headers"
                events = received.count(b"data: ")
                if events:  # vLLM's first event (the role) and the first token's usually come together
                    seen = "first_token" if events <= 2 else "mid_stream"
                header, _, content = received.partition(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(header)
                if b"data: [DONE]" in received or (length and len(content) >= int(length.group(1))):
                    return "whole answer"
                if moment == "headers" or (moment == "first_token" and events >= 1):
                    break
                if moment == "mid_stream" and events >= 4:
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                data = await asyncio.wait_for(reader.read(65536), left)
            except asyncio.TimeoutError:
                break
            if not data:
                return f"closed by the gateway after {seen}"
            received += data
    finally:
        if rng.random() < 0.5:  # a reset, as a crashed client or a killed proxy would send
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
    return f"hung up after {seen}"


async def test_a_thousand_clients_hanging_up_at_random_moments_leave_nothing_behind(gateway):
    from ray import serve

    url = urlsplit(gateway)
    before = stats(gateway)["priorities"]
    rng = random.Random(20261122)
    plans = [(rng.choice(MOMENTS), random.Random(rng.random())) for _ in range(CLIENTS)]
    gate = asyncio.Semaphore(AT_ONCE)
    started = time.monotonic()
    done = 0

    async def run(moment: str, client_rng: random.Random) -> str:
        nonlocal done
        async with gate:
            seen = await one_client(url.hostname, url.port, moment, client_rng)
        done += 1
        if done % 200 == 0:
            print(f"\n{done}/{CLIENTS} clients done in {time.monotonic() - started:.0f}s", flush=True)
        return seen

    seen = await asyncio.wait_for(asyncio.gather(*(run(m, r) for m, r in plans)), timeout=1200)
    tally = Counter(seen)
    print("\nwhat the clients saw:", dict(sorted(tally.items())))

    llm = serve.get_deployment_handle("LLMServer", APP_NAME)
    deadline = time.monotonic() + 180  # a wait, not a bound on speed: a busy machine ends the aborts later
    while True:
        after = stats(gateway)
        router = after["router"]
        unfinished = await llm.num_unfinished.remote()
        left = {
            "slots in use": router["in_flight"],
            "queued": sum(router[f"queued_{c}"] for c in CLASSES),
            "engine unfinished": unfinished,
        }
        ended = sum(
            after["priorities"][c][k] - before[c][k]
            for c in CLASSES
            for k in ("completed", "rejected", "cancelled", "error")
        )
        if (not any(left.values()) and ended == CLIENTS) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    print("left behind:", left, "ended counted:", ended)
    assert left == {"slots in use": 0, "queued": 0, "engine unfinished": 0}
    assert ended == CLIENTS, "every request ended counted"
    assert not [s for s in tally if s.startswith("http 5") or s.startswith("closed by")], tally
    assert set(s for s in tally if s.startswith("http")) <= {"http 429"}, tally
    for moment in ("nothing", "headers", "first_token", "mid_stream"):
        assert tally[f"hung up after {moment}"] >= 20, f"too few hang-ups after {moment}: {tally}"
    errors = sum(after["priorities"][c]["error"] - before[c]["error"] for c in CLASSES)
    assert errors == 0, "a hang-up is a cancellation, never an error"
    rejected = sum(after["priorities"][c]["rejected"] - before[c]["rejected"] for c in CLASSES)
    # More, not fewer: a client may hang up before its 429 arrives.
    assert rejected >= tally["http 429"], "every 429 the clients saw is counted"
