"""A Router's report of a failed replica takes it out of dispatch only if it also fails a health check."""

from __future__ import annotations

from aiohttp import web
from conftest import serve_in_process

from serve_app.config import QueueConfig
from serve_app.deployments.admission import AdmissionActor


async def _health_server() -> tuple[web.AppRunner, str]:
    """A replica that answers /health, on a port the kernel picks; and its URL."""
    app = web.Application()
    app.router.add_get("/health", lambda request: web.Response(text="ok"))
    return await serve_in_process(app)


async def test_one_failed_connection_keeps_a_healthy_replica_and_a_dead_one_leaves():
    server, url = await _health_server()
    actor = AdmissionActor(QueueConfig(), replica_check_s=3600)  # no periodic check during the test
    await actor.register_replica("r1", url, 4)
    try:
        await actor.report_failure(url)  # a reset connection under load, say: the replica still answers
        assert (await actor.state())["replicas"] == 1
        await server.cleanup()
        await actor.report_failure(url)  # now it is gone for real
        assert (await actor.state())["replicas"] == 0
    finally:
        actor._checker.cancel()
        await server.cleanup()
