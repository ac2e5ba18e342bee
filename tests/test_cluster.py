"""A real Ray cluster of two nodes on this one machine (`ray.cluster_utils.Cluster`, as Ray tests itself): the
Routers, Admission and metrics on the head, the LLMServer replica (vLLM with two API servers) placed on a worker
node through a custom resource. The worker node is removed while streams run, then added back (issue 19).

- the streams on it end with an OpenAI error event and `[DONE]`;
- queued and new requests get 503 "recovering" with Retry-After, as no replica is left;
- Admission forgets the dead replica, with no slot leaked, and the counters add up;
- within 30 s no process of its engine is left (the node's removal is one of the ways a replica ends);
- with the node back, a replica starts there and serves.

It needs its own Ray, so the scenario runs in a child process (`python tests/test_cluster.py`), which prints
what it saw as JSON; the test asserts on that."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.engine

MODEL_ID = "smollm2-135m-instruct"
GRACE_S = 30  # issue 19: within 30 s no process of the engine is left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _engine_pids(replica_pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(replica_pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _llm_replica() -> dict:
    from ray.util.state import list_actors

    alive = [
        a
        for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        if (a.get("class_name") or "").endswith("LLMServer")
    ]
    assert len(alive) == 1, alive
    return alive[0]


async def _scenario() -> dict:
    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from serve_app.app import build_app

    facts: dict = {}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 4, "include_dashboard": False, "port": _free_port()},
    )
    worker = cluster.add_node(num_cpus=2, resources={"llm_node": 1})
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False)
    port = _free_port()
    args = {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 8, "api_server_count": 2},
            "resources": {"llm_node": 1},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 1,
                "max_ongoing_requests": 2,
            },
        },
        "queue": {"high": {"max_wait_s": 120}, "medium": {"max_wait_s": 120}, "low": {"max_wait_s": 120}},
        "http": {"host": "127.0.0.1", "port": port},
        "router": {"num_replicas": 1},
        "metrics_flush_s": 0.2,
        "replica_check_s": 0.5,
        "admission": {"reserved": {"high": 0}},
    }
    base = f"http://127.0.0.1:{port}"
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(args), name="cluster", route_prefix="/", blocking=False)
        async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(300, connect=10)) as client:
            await _until_serving(client, 900)
            replica = _llm_replica()
            facts["replica_on_worker"] = replica["node_id"] == worker.node_id
            engine = _engine_pids(replica["pid"])
            facts["engine_processes"] = len(engine)
            state = (await client.get("/v1/stats")).json()["router"]
            engine_port = int(state["replica_detail"][0]["replica"].rsplit(":", 1)[1])

            started = [asyncio.Event(), asyncio.Event()]
            streams = [asyncio.ensure_future(_stream(client, 2000, event)) for event in started]
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 300)
            queued = [asyncio.ensure_future(_post(client)) for _ in range(2)]
            await _until(client, lambda s: s["queued_medium"] == 2, 60)

            cluster.remove_node(worker, allow_graceful=False)
            removed = time.monotonic()
            facts["streams"] = [_ending(await task) for task in streams]
            facts["queued"] = [await task for task in queued]
            facts["new"] = [await _post(client) for _ in range(2)]
            after = await _until(client, lambda s: s["replicas"] == 0 and s["in_flight"] == 0, 60)
            facts["after_removal"] = {k: after[k] for k in ("replicas", "in_flight", "queued_medium", "capacity")}
            left = engine
            while time.monotonic() - removed < GRACE_S + 30 and (left or _port_taken(engine_port)):
                await asyncio.sleep(1)
                left = [pid for pid in engine if _alive(pid)]
            facts["engine_left"] = left
            facts["engine_gone_s"] = round(time.monotonic() - removed, 1)
            facts["engine_port_free"] = not _port_taken(engine_port)

            cluster.add_node(num_cpus=2, resources={"llm_node": 1})
            back = time.monotonic()
            await _until_serving(client, 900)
            facts["rejoined_s"] = round(time.monotonic() - back, 1)
            facts["after_rejoin"] = await _post(client)
            stats = await client.get("/v1/stats")
            facts["priorities"] = {
                label: {k: v for k, v in figures.items() if isinstance(v, int)}
                for label, figures in stats.json()["priorities"].items()
            }
            facts["final"] = {k: stats.json()["router"][k] for k in ("replicas", "in_flight", "queued_medium")}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    return facts


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _until_serving(client, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get("/health", timeout=5)).status_code == 200:
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, "not serving"
        await asyncio.sleep(1)


async def _until(client, check, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = (await client.get("/v1/stats")).json()["router"]
        if check(state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.2)


def _body(max_tokens: int, stream: bool) -> dict:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _stream(client, max_tokens: int, started: asyncio.Event) -> tuple[int, str]:
    async with client.stream(
        "POST", "/v1/chat/completions", json=_body(max_tokens, True), headers={"X-Priority": "medium"}
    ) as response:
        text = ""
        async for chunk in response.aiter_text():
            text += chunk
            if "data: " in text:
                started.set()
        return response.status_code, text


async def _post(client) -> dict:
    response = await client.post("/v1/chat/completions", json=_body(8, False), headers={"X-Priority": "medium"})
    error = response.json().get("error", {}) if response.status_code != 200 else {}
    return {"status": response.status_code, "retry_after": response.headers.get("retry-after"), "error": error}


def _ending(result: tuple[int, str]) -> dict:
    status, text = result
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
    return {"status": status, "done": bool(events) and events[-1] == "[DONE]", "errors": errors}


def test_a_removed_node_ends_its_streams_cleanly_leaves_no_engine_and_its_replica_comes_back_with_it():
    env = {**os.environ, "RAY_ADDRESS": ""}
    run = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=2400, env=env, cwd=os.path.dirname(__file__)
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("FACTS ")]
    assert run.returncode == 0 and lines, f"the scenario failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    facts = json.loads(lines[-1][6:])
    print("\n" + json.dumps(facts, indent=1))
    assert facts["replica_on_worker"], "the custom resource places the replica on the worker node"
    assert facts["engine_processes"] >= 3, "vLLM's server, its two API servers, its engine core"
    for stream in facts["streams"]:  # cut by the node's end: an OpenAI error event, then [DONE]
        assert stream["status"] == 200 and stream["done"] and stream["errors"], stream
    for answer in facts["queued"] + facts["new"]:
        assert answer["status"] == 503 and answer["retry_after"], answer
        assert "recovering" in answer["error"]["message"], answer
    assert facts["after_removal"]["replicas"] == 0 and facts["after_removal"]["in_flight"] == 0, facts
    assert facts["engine_left"] == [] and facts["engine_port_free"], facts
    assert facts["engine_gone_s"] <= GRACE_S, facts
    assert facts["after_rejoin"]["status"] == 200, facts
    assert facts["final"] == {"replicas": 1, "in_flight": 0, "queued_medium": 0}, facts
    medium = facts["priorities"]["medium"]
    sent = len(facts["queued"]) + len(facts["new"]) + 1 + 2  # and the two streams, sent as medium
    ended = sum(medium.get(outcome, 0) for outcome in ("completed", "rejected", "error", "cancelled"))
    assert ended == sent, medium


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print("FACTS " + json.dumps(asyncio.run(_scenario())), flush=True)
