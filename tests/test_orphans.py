"""No engine outlives its replica: the LLMServer replica's worker process is SIGKILLed (an OOM kill, a node agent
stopping it), and every process of its vLLM server (the server, its engine core and workers) is gone within 30 s,
its port free; Ray Serve then starts a new replica, which serves. Before the reaper that `server_process` forks,
an engine left this way held an H200's memory until it was killed by pid (issue 19)."""

from __future__ import annotations

import asyncio
import signal
import time
from urllib.parse import urlparse

import httpx
import psutil
import pytest
from conftest import MODEL_ID, port_taken, stats

from serve_app.engine.server_process import GRACE_S

pytestmark = [pytest.mark.engine, pytest.mark.destructive]

BOUND_S = 30  # issue 19's bound: no process of a stopped engine left after this


def replica_process() -> psutil.Process:
    """The suite's LLMServer replica (app 'gateway'): the Ray worker that runs it."""
    found = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:gateway:LLMServer" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(found) == 1, f"one LLMServer replica: {[p.pid for p in found]}"
    return found[0]


async def test_a_replica_killed_outright_leaves_no_engine_and_a_new_one_serves(gateway):
    replica = replica_process()
    engine = replica.children(recursive=True)
    names = sorted({" ".join(p.cmdline()[:3]) or p.name() for p in engine})
    assert any("EngineCore" in " ".join(p.cmdline() or [p.name()]) for p in engine), names
    [detail] = stats(gateway)["router"]["replica_detail"]
    server = urlparse(f"http://{detail['replica']}")
    assert port_taken(server.port, server.hostname), "the engine's server listens"

    replica.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, alive = psutil.wait_procs(engine, timeout=BOUND_S)
    left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running {BOUND_S} s after the replica died: {[(p.pid, p.cmdline()[:4]) for p in left]}"
    assert not port_taken(server.port, server.hostname), "the engine's port is free again"
    print(f"\nengine gone {time.monotonic() - killed:.1f} s after its replica (reaper grace {GRACE_S} s)")

    async with httpx.AsyncClient(base_url=gateway, timeout=httpx.Timeout(120, connect=10)) as http:
        deadline = time.monotonic() + 900  # Ray Serve starts a new replica: a fresh engine, on a busy machine
        while (await http.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, "no new replica came up"
            await asyncio.sleep(1)
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        answer = await http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
