"""A Router dies (SIGKILL) with a stream running and requests queued through it and through the other Router.

Clients of the dead Router see a broken connection, as from any server that dies. Admission cannot see the death
(a Ray call from a dead caller is not cancelled), so it holds the dead Router's grants as leases: within
`router_lease_s` its slot is free again and its queued requests have left the queue, and the other Router's
queued clients are served as if nothing had happened (issue 19)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import MODEL_ID, stats

pytestmark = [pytest.mark.engine, pytest.mark.destructive]

LEASE_S = 10  # tests/conftest.py's admission.router_lease_s


def routers() -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:gateway:Router" in " ".join(p.info["cmdline"] or [])
    ]


def owner(routers_: list[psutil.Process], client_port: int) -> psutil.Process | None:
    """The Router process at the other end of a client's connection."""
    for proc in routers_:
        for conn in proc.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port and conn.status == psutil.CONN_ESTABLISHED:
                return proc
    return None


class Client:
    """One request on its own raw HTTP/1.1 socket, so that its local port names the Router that took it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.port = writer.get_extra_info("sockname")[1]
        self.received = b""

    @classmethod
    async def send(cls, base_url: str, priority: str, max_tokens: int) -> Client:
        url = urlsplit(base_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        payload = json.dumps(
            {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nX-Priority: {priority}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        return cls(reader, writer)

    async def read_until(self, marker: bytes, timeout_s: float) -> bool:
        """Reads until `marker` is in what came (True) or the connection ends (False)."""
        deadline = time.monotonic() + timeout_s
        while marker not in self.received:
            left = deadline - time.monotonic()
            assert left > 0, f"neither {marker!r} nor the end within {timeout_s} s: {self.received[-200:]!r}"
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except (ConnectionResetError, BrokenPipeError):
                return False
            if not chunk:
                return False
            self.received += chunk
        return True

    def close(self) -> None:
        self.writer.close()


async def test_a_dead_routers_slot_and_queue_are_freed_and_the_other_routers_clients_see_nothing(gateway):
    two = routers()
    assert len(two) == 2, "the suite runs two Routers"
    clients: list[Client] = []
    try:
        running = await Client.send(gateway, "low", 2000)
        clients.append(running)
        assert await running.read_until(b"data: ", 300), "the long stream runs"
        dead = owner(two, running.port)
        assert dead is not None
        # queue requests until each Router holds at least one (the kernel spreads connections over the two)
        queued: dict[int, list[Client]] = {p.pid: [] for p in two}
        for _ in range(8):
            if all(queued.values()):
                break
            client = await Client.send(gateway, "medium", 8)
            clients.append(client)
            for _ in range(50):
                proc = owner(two, client.port)
                if proc is not None:
                    queued[proc.pid].append(client)
                    break
                await asyncio.sleep(0.1)
        assert all(queued.values()), (
            f"no queued request on one of the Routers: { {k: len(v) for k, v in queued.items()} }"
        )
        waiting = sum(len(v) for v in queued.values())
        before = stats(gateway, until=lambda now: now["router"]["queued_medium"] == waiting, settle=False)
        assert (before["router"]["queued_medium"], before["router"]["in_flight"]) == (waiting, 1), before["router"]

        dead.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for client in [running, *queued[dead.pid]]:
            assert not await client.read_until(b"data: [DONE]", 60), "the dead Router's clients: a broken connection"
        for client in next(v for pid, v in queued.items() if pid != dead.pid):
            assert await client.read_until(b"data: [DONE]", 300), "the other Router's clients are served"
            assert b"HTTP/1.1 200" in client.received and b'"error"' not in client.received
        served_s = time.monotonic() - killed
        after = stats(
            gateway, until=lambda now: now["router"]["in_flight"] == 0 and now["router"]["queued_medium"] == 0
        )
        router = after["router"]
        assert (router["in_flight"], router["queued_medium"], router["queued_low"]) == (0, 0, 0)
        assert router["reclaimed_slots"] >= 1 and router["reclaimed_queued"] >= len(queued[dead.pid])
        print(f"\nthe other Router's queued clients served {served_s:.1f} s after the kill (lease {LEASE_S} s)")
    finally:
        for client in clients:
            client.close()
