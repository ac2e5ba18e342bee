"""The client side of the gateway, on the OpenAI SDK: a client per priority class with that class's defaults, and
`map_prompts` for the seeds' "process a large dataset" case.

    from serve_app.client import client, map_prompts
    chat = client("high")                       # sync, short timeout, few retries
    answers = map_prompts(prompts, priority="medium", concurrency=32)   # async fan-out, with a progress bar

The SDK retries 429 and 503 itself and waits as the gateway's `Retry-After` says; the class sets how often and
how long. For bulk work that may wait for hours, use a batch (`serve-app-batch`) instead."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import openai
from tqdm import tqdm

DEFAULT_URL = os.environ.get("SERVE_APP_URL", "http://127.0.0.1:8000")


@dataclass(frozen=True)
class ClassDefaults:
    timeout_s: float  # for a whole answer: high is short, so that a stuck call fails fast
    max_retries: int  # 429 and 503, each after the gateway's Retry-After
    max_connections: int  # the pooled connection limit


DEFAULTS = {
    "high": ClassDefaults(timeout_s=30.0, max_retries=2, max_connections=64),
    "medium": ClassDefaults(timeout_s=120.0, max_retries=4, max_connections=128),
    "low": ClassDefaults(timeout_s=600.0, max_retries=8, max_connections=256),
}


def _options(priority: str, base_url: str | None, api_key: str | None) -> tuple[ClassDefaults, dict[str, Any]]:
    if priority not in DEFAULTS:
        raise ValueError(f"priority must be one of {', '.join(DEFAULTS)}, not {priority!r}")
    defaults = DEFAULTS[priority]
    return defaults, {
        "base_url": f"{(base_url or DEFAULT_URL).rstrip('/')}/v1",
        "api_key": api_key or os.environ.get("SERVE_APP_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none",
        "timeout": defaults.timeout_s,
        "max_retries": defaults.max_retries,
        "default_headers": {"X-Priority": priority},
    }


def client(priority: str = "medium", base_url: str | None = None, api_key: str | None = None) -> openai.OpenAI:
    """A sync OpenAI client whose every request runs at `priority`."""
    defaults, options = _options(priority, base_url, api_key)
    pool = httpx.Limits(max_connections=defaults.max_connections, max_keepalive_connections=defaults.max_connections)
    return openai.OpenAI(**options, http_client=httpx.Client(limits=pool, timeout=defaults.timeout_s))


def async_client(
    priority: str = "medium", base_url: str | None = None, api_key: str | None = None
) -> openai.AsyncOpenAI:
    """An async OpenAI client whose every request runs at `priority`."""
    defaults, options = _options(priority, base_url, api_key)
    pool = httpx.Limits(max_connections=defaults.max_connections, max_keepalive_connections=defaults.max_connections)
    return openai.AsyncOpenAI(**options, http_client=httpx.AsyncClient(limits=pool, timeout=defaults.timeout_s))


async def amap_prompts(
    prompts: Sequence[str],
    *,
    priority: str = "medium",
    concurrency: int = 16,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    progress: bool = True,
    **params: Any,
) -> list[str | Exception]:
    """Each prompt as one chat request, at most `concurrency` at once; the answers in the prompts' order. A prompt
    that fails after the class's retries gives its exception in its place, so one failure loses nothing else."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    api = async_client(priority, base_url, api_key)
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(prompts), desc=f"{priority} prompts", unit="prompt", disable=not progress)
    try:
        if model is None:
            model = (await api.models.list()).data[0].id

        async def one(prompt: str) -> str | Exception:
            async with gate:
                try:
                    answer = await api.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": prompt}], **params
                    )
                    return answer.choices[0].message.content or ""
                except openai.OpenAIError as exc:
                    return exc
                finally:
                    bar.update(1)

        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        bar.close()
        await api.close()


def map_prompts(prompts: Sequence[str], **options: Any) -> list[str | Exception]:
    """`amap_prompts` from synchronous code (a script, a notebook cell without a running loop)."""
    return asyncio.run(amap_prompts(prompts, **options))
