"""Load shapes: closed loop (N clients, each sends when its last answer ends) and open loop (a schedule).

Each runs in either client mode: `sync` is a thread pool of blocking calls sharing one pooled
httpx.Client; `async` is one asyncio event loop with one httpx.AsyncClient.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from serve_app.bench.clients import CLOCK, RequestResult, send_async, send_sync
from serve_app.bench.workload import RequestSpec, request_body

Progress = Callable[[RequestResult], None]
VLLM_PRIORITY = {"high": 0, "medium": 1, "low": 2}  # what `vllm serve --scheduling-policy priority` reads


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str
    endpoint: str = "chat"
    priority_header: str = "X-Priority"
    ignore_eos: bool = False
    timeout_s: float = 120.0
    priority_as: str = "header"  # "vllm": bare vLLM's integer body field instead (high=0, medium=1, low=2)

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.endpoint == "chat" else "/v1/completions"

    def prepare(self, spec: RequestSpec) -> tuple[dict, dict[str, str]]:
        body = request_body(spec, self.model, self.endpoint, self.ignore_eos)
        if spec.priority and self.priority_as == "vllm":
            return {**body, "priority": VLLM_PRIORITY[spec.priority]}, {}
        headers = {self.priority_header: spec.priority} if spec.priority else {}
        return body, headers


@dataclass
class StepRun:
    results: list[RequestResult]
    duration_s: float
    client_cpu_s: float = 0.0  # CPU the benchmark process itself used: what each client mode costs


def run_step(
    target: Target,
    mode: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int | None = None,
    arrivals: Sequence[float] | None = None,
    sync_workers: int = 64,
    progress: Progress = lambda _: None,
) -> StepRun:
    """Exactly one of `concurrency` (closed loop) or `arrivals` (open loop, offsets in s) is given."""
    if (concurrency is None) == (arrivals is None):
        raise ValueError("give either concurrency or arrivals")
    cpu_before = time.process_time()
    if mode == "sync":
        run = _run_sync(target, specs, concurrency or sync_workers, arrivals, progress)
    elif mode == "async":
        run = asyncio.run(_run_async(target, specs, concurrency, arrivals, progress))
    else:
        raise ValueError(f"unknown client mode {mode!r}")
    run.client_cpu_s = time.process_time() - cpu_before
    return run


def _limits(width: int) -> httpx.Limits:
    return httpx.Limits(max_connections=width, max_keepalive_connections=width)


def _run_sync(
    target: Target, specs: Sequence[RequestSpec], width: int, arrivals: Sequence[float] | None, progress: Progress
) -> StepRun:
    results: list[RequestResult] = []
    lock = threading.Lock()
    timeout = httpx.Timeout(target.timeout_s, connect=10.0)
    with httpx.Client(base_url=target.base_url, limits=_limits(width), timeout=timeout) as client:
        origin = CLOCK()

        def one(spec: RequestSpec, intended: float | None) -> None:
            body, headers = target.prepare(spec)
            result = send_sync(client, target.path, body, headers, spec, origin, intended)
            with lock:
                results.append(result)
            progress(result)

        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="bench") as pool:
            if arrivals is None:  # closed loop: `width` workers pull the next request as they finish
                pending = iter(specs)

                def worker() -> None:
                    while True:
                        with lock:
                            spec = next(pending, None)
                        if spec is None:
                            return
                        one(spec, None)

                futures = [pool.submit(worker) for _ in range(width)]
            else:  # open loop: submit on schedule; a busy pool makes requests start late (client lag)
                futures = []
                for spec, at in zip(specs, arrivals, strict=True):
                    delay = at - (CLOCK() - origin)
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(pool.submit(one, spec, at))
            for future in futures:
                future.result()
        duration = CLOCK() - origin
    return StepRun(sorted(results, key=lambda r: r.index), duration)


async def _run_async(
    target: Target,
    specs: Sequence[RequestSpec],
    concurrency: int | None,
    arrivals: Sequence[float] | None,
    progress: Progress,
) -> StepRun:
    results: list[RequestResult] = []
    width = concurrency or max(len(specs), 1)
    timeout = httpx.Timeout(target.timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=target.base_url, limits=_limits(width), timeout=timeout) as client:
        origin = CLOCK()

        async def one(spec: RequestSpec, intended: float | None) -> None:
            body, headers = target.prepare(spec)
            result = await send_async(client, target.path, body, headers, spec, origin, intended)
            results.append(result)
            progress(result)

        if arrivals is None:
            queue: asyncio.Queue[RequestSpec] = asyncio.Queue()
            for spec in specs:
                queue.put_nowait(spec)

            async def worker() -> None:
                while not queue.empty():
                    await one(queue.get_nowait(), None)

            await asyncio.gather(*(worker() for _ in range(width)))
        else:
            tasks = []
            for spec, at in zip(specs, arrivals, strict=True):
                delay = at - (CLOCK() - origin)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(spec, at)))
            await asyncio.gather(*tasks)
        duration = CLOCK() - origin
    return StepRun(sorted(results, key=lambda r: r.index), duration)
