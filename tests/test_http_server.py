"""The Router's own HTTP server must leave the process's logging alone: uvicorn's default logging config
(dictConfig) closes every existing handler, Ray Serve's replica log among them, and a Router's log then
stopped after "Started initializing replica" (every error it logged was lost)."""

from __future__ import annotations

import logging

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serve_app.http import server as http_server


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        self.closed = True
        super().close()


async def test_starting_the_server_keeps_the_handlers_of_the_process():
    handler = RecordingHandler()
    logger = logging.getLogger("ray.serve.test_http_server")
    logger.addHandler(handler)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    sock = http_server.bind("127.0.0.1", 0)
    server = await http_server.start(app, sock)
    try:
        port = sock.getsockname()[1]
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).text == "ok"
        logger.warning("after the server started")
        assert not handler.closed, "uvicorn closed the process's log handlers"
        assert handler.messages == ["after the server started"]
    finally:
        await http_server.drain(server, 5)
        logger.removeHandler(handler)
