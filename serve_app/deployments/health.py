"""The LLM replicas' health probe: GET {url}/health on vLLM's server, as Admission and the replica itself ask it."""

from __future__ import annotations

import asyncio

import aiohttp


async def health_status(session: aiohttp.ClientSession, url: str) -> int | None:
    """The HTTP status that GET {url}/health answers, or None when no answer came (refused, reset, timed out
    under the session's timeout)."""
    try:
        async with session.get(f"{url}/health") as response:
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def answers_health(session: aiohttp.ClientSession, url: str) -> bool:
    """True iff GET {url}/health answers 200."""
    return await health_status(session, url) == 200
