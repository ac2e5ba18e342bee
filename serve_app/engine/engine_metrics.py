"""vLLM's own load and cache figures, read from its `/metrics`: waiting and running requests, KV-cache usage
and prefix-cache hits, under the names of the vLLM releases we run (0.26 on the GPU hosts, 0.32 on CPU, and
the older `gpu_` names). Admission reads them at its replica check's pace (every `replica_check_s`), never
per request or per token; they are shown per replica, beside the gateway's own token counts, so the two can
be compared. Needs vLLM's statistics on (`disable_log_stats` false, its default).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

# Family names as prometheus_client's parser gives them (a counter's without `_total`), newest first.
WAITING = ("vllm:num_requests_waiting",)
RUNNING = ("vllm:num_requests_running",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_HITS = ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
PREFIX_QUERIES = ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")


@dataclass(frozen=True)
class EngineFigures:
    waiting: float | None = None
    running: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    prefix_cache_hits: float | None = None  # tokens, since the engine started
    prefix_cache_queries: float | None = None

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries

    def as_dict(self) -> dict[str, float | None]:
        return {**asdict(self), "prefix_cache_hit_rate": self.prefix_cache_hit_rate}


WANTED = WAITING + RUNNING + KV_USAGE + PREFIX_HITS + PREFIX_QUERIES


def parse(text: str) -> EngineFigures:
    """The figures in a `/metrics` page, each summed over its label sets (engines, models); None if absent.
    Only the wanted lines are parsed: the page has hundreds of histogram lines, and this runs on Admission's
    event loop, where a long parse would delay every grant."""
    lines = [line for line in text.splitlines() if line.startswith(WANTED)]
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in WANTED:
                sums[name] = sums.get(name, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float | None:
        return next((sums[n] for n in names if n in sums), None)

    return EngineFigures(first(WAITING), first(RUNNING), first(KV_USAGE), first(PREFIX_HITS), first(PREFIX_QUERIES))


async def read(session: aiohttp.ClientSession, base_url: str) -> EngineFigures | None:
    """The engine's figures now, or None when it does not answer (the health check deals with that)."""
    try:
        async with session.get(base_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                return None
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    try:
        return parse(text)
    except ValueError:
        return None
