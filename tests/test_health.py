"""The replicas' health probe (deployments/health.py) against a real in-process HTTP server."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from conftest import free_port, serve_in_process

from serve_app.deployments.health import answers_health, health_status


async def _server(status: int = 200, hold: asyncio.Event | None = None) -> tuple[web.AppRunner, str]:
    """A server whose /health answers `status` (once `hold` is set, if given), on a port the kernel picks;
    and its URL."""

    async def health(request: web.Request) -> web.Response:
        if hold is not None:
            await hold.wait()
        return web.Response(status=status, text="ok" if status == 200 else "unhealthy")

    app = web.Application()
    app.router.add_get("/health", health)
    return await serve_in_process(app)


async def test_a_200_is_healthy():
    server, url = await _server(200)
    try:
        async with aiohttp.ClientSession() as session:
            assert await health_status(session, url) == 200
            assert await answers_health(session, url)
    finally:
        await server.cleanup()


async def test_a_503_is_not():
    server, url = await _server(503)
    try:
        async with aiohttp.ClientSession() as session:
            assert await health_status(session, url) == 503
            assert not await answers_health(session, url)
    finally:
        await server.cleanup()


async def test_a_refused_connection_is_not():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with aiohttp.ClientSession() as session:
        assert await health_status(session, url) is None
        assert not await answers_health(session, url)


async def test_no_answer_within_the_sessions_timeout_is_not():
    hold = asyncio.Event()
    server, url = await _server(200, hold)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.1)) as session:
            assert await health_status(session, url) is None
            assert not await answers_health(session, url)
    finally:
        hold.set()
        await server.cleanup()
