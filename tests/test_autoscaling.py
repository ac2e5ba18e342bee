"""Autoscaling on queued demand, on the real engine: a load step takes LLMServer from 1 to 2 replicas, idle
brings it back to 1. A second, small application beside the suite's gateway, with fast autoscaling.

Two CPU engines on one small host share its cores (configs/local.yaml explains why it stays at one
replica); here the second one only has to start, not to be fast.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import MODEL_ID, wait_until_ready

pytestmark = pytest.mark.engine

PORT = 8322
APP = "scaling"
ARGS = {
    "llm": {
        "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 4},
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "max_ongoing_requests": 2,
            "upscale_delay_s": 0,
            "downscale_delay_s": 5,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    },
    "admission": {"adaptive_limit": False},
    "http": {"host": "127.0.0.1", "port": PORT},
    "replica_check_s": 0.5,
}
LONG = {
    "model": MODEL_ID,
    "messages": [{"role": "user", "content": "Count to one thousand."}],
    "max_tokens": 1900,
    "ignore_eos": True,
    "stream": True,
}


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["LLMServer"]
    return deployment.replica_states.get("RUNNING", 0)


async def until(predicate, timeout_s: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"not reached within {timeout_s}s"
        await asyncio.sleep(0.5)
    return time.monotonic() - started


async def hold_stream(http: httpx.AsyncClient) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=LONG, headers={"X-Priority": "low"}) as response:
        async for _ in response.aiter_lines():
            pass


async def test_a_load_step_scales_to_two_replicas_and_idle_scales_back_to_one(gateway):
    from ray import serve

    from serve_app.app import build_app

    started = time.monotonic()
    serve.run(build_app(ARGS), name=APP, route_prefix=f"/{APP}", blocking=False)
    try:
        await asyncio.to_thread(wait_until_ready, f"http://127.0.0.1:{PORT}", started)
        assert running_replicas() == 1
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=600) as http:
            # 2 running + 4 queued, at a target of 1 per replica: the policy asks for the maximum, 2.
            load = [asyncio.create_task(hold_stream(http)) for _ in range(6)]
            up_s = await until(lambda: running_replicas() == 2, timeout_s=400)
            health = (await http.get("/health")).json()
            assert health["capacity"] == 4, "the new replica's slots joined the gateway"
            for task in load:
                task.cancel()
            await asyncio.gather(*load, return_exceptions=True)
        down_s = await until(lambda: running_replicas() == 1, timeout_s=240)
        print(f"\nscaled up in {up_s:.0f}s, down in {down_s:.0f}s")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{PORT}", timeout=60) as http:
            await until(lambda: httpx.get(f"http://127.0.0.1:{PORT}/health").json().get("capacity") == 2, 60)
            answer = await http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2})
            assert answer.status_code == 200, "the replica that stayed still serves"
    finally:
        serve.delete(APP)
