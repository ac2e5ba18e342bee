"""An HTTP server inside a Ray Serve replica, on the replica's own event loop.

The Router listens on the public port itself (no Ray proxy hop) and reaches vLLM's own server
over plain HTTP, so a streamed token is bytes in a socket, not a Ray object. Several Router
replicas on one node share the port through SO_REUSEPORT; the kernel spreads connections.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvicorn
from starlette.responses import StreamingResponse

T = TypeVar("T")


class PortInUse(RuntimeError):
    pass


def bind(host: str, port: int) -> socket.socket:
    """A listening socket that every Router replica on this node may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"{host}:{port} is taken by another program. If it is Ray Serve's own HTTP proxy, set "
                "`proxy_location: Disabled` in the config (the Router serves HTTP itself), or pick another "
                "`http.port` under args"
            ) from None
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def start(app: Any, sock: socket.socket) -> uvicorn.Server:
    """Serves `app` on `sock` in a task of the running loop; returns once it accepts connections."""
    # log_config=None: uvicorn's own logging config (dictConfig) would close every handler of the process,
    # Ray Serve's replica log among them, and the Router's log would stop after "Started initializing".
    config = uvicorn.Config(
        app, log_config=None, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    server._serving_task = task  # type: ignore[attr-defined]  # keeps a reference: tasks are weakly held
    return server


async def drain(server: uvicorn.Server, timeout_s: float) -> None:
    """Closes the listening socket (the other replicas sharing the port keep accepting), closes idle
    connections, and waits for the responses in progress, streams included; past `timeout_s` it cuts them."""
    server.should_exit = True
    task: asyncio.Task[None] = server._serving_task  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except asyncio.TimeoutError:
        server.force_exit = True
        await asyncio.wait({task}, timeout=5)


async def until_disconnected(receive: Any) -> None:
    """Returns when the client hangs up; call only once the request body has been read."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    pass


async def unless_disconnected(receive: Any, work: Awaitable[T]) -> T:
    """Awaits `work`, but cancels it and raises ClientGone as soon as the client hangs up.

    uvicorn does not cancel a handler whose client left, so a request waiting in a queue, or
    generating a whole non-streamed answer, would otherwise hold its place for nothing."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    raise ClientGone()


class SettledStreamingResponse(StreamingResponse):
    """A stream whose `settle` callback runs exactly once when the response ends, however it ends:
    if the client leaves before the body is first read, the body generator never starts and its own
    `finally` could not release anything."""

    def __init__(self, content: Any, settle: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kwargs)
        self._settle = settle

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: under a cancelled scope every await is cancelled again, and settling must finish.
            await asyncio.shield(self._settle())
