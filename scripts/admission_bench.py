"""The Admission control path alone: acquire/release pairs per second, and acquire latency.

Two driver replicas stand in for Routers; each request holds its slot for 10 ms of "generation".
No engine, no HTTP: this measures only what every request costs the gateway's shared queues.
    .venv/bin/python scripts/admission_bench.py 256     # concurrent requests (slots = the same)
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import ray
from ray import serve

from serve_app.config import SINGLE_LOOP_ENV, QueueConfig
from serve_app.deployments.admission import AdmissionDeployment
from serve_app.deployments.admission_client import AdmissionClient
from serve_app.policy.priority import Priority

SECONDS = 10


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}})
class Driver:
    def __init__(self, admission) -> None:
        self.admission = AdmissionClient(admission)

    async def run(self, concurrency: int, name: str) -> dict:
        await self.admission.register_replica(name, f"http://{name}", concurrency)
        waits: list[float] = []
        done = 0
        end = time.monotonic() + SECONDS

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                request_id, asked = uuid.uuid4().hex, time.monotonic()
                await self.admission.acquire(request_id, Priority.MEDIUM)
                waits.append(time.monotonic() - asked)
                await asyncio.sleep(0.01)
                self.admission.release(request_id)
                done += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        waits.sort()
        return {
            "pairs_per_s": round(done / SECONDS),
            "acquire_p50_ms": round(1000 * waits[len(waits) // 2], 1),
            "acquire_p99_ms": round(1000 * waits[int(len(waits) * 0.99)], 1),
        }


def main() -> None:
    concurrency = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    serve.start(proxy_location="Disabled")
    handle = serve.run(Driver.bind(AdmissionDeployment.bind(0.0, QueueConfig(), None, 60.0)), name="admission-bench")
    runs = [handle.run.remote(concurrency // 2, f"driver{i}") for i in range(2)]
    print([r.result() for r in runs])
    serve.shutdown()


if __name__ == "__main__":
    main()
