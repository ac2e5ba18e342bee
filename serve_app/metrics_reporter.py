"""Router-side batching of finished requests, so recording a request costs a list append."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.stats import RequestRecord

logger = logging.getLogger("ray.serve")

Send = Callable[[list[dict[str, Any]], dict[str, Any]], Awaitable[None]]


class MetricsReporter:
    def __init__(self, send: Send, router_state: Callable[[], dict[str, Any]], flush_s: float) -> None:
        self._send = send
        self._router_state = router_state
        self._flush_s = flush_s
        self._pending: list[dict[str, Any]] = []
        self._last_state: dict[str, Any] | None = None
        self._lock = asyncio.Lock()  # a flush returns only once everything added before it has landed

    def add(self, record: RequestRecord) -> None:
        self._pending.append(record.to_dict())

    async def flush(self) -> None:
        """Sends only when there is news: finished requests, or a changed queue picture."""
        async with self._lock:
            state = self._router_state()
            if not self._pending and state == self._last_state:
                return
            batch, self._pending = self._pending, []
            try:
                await self._send(batch, state)
                self._last_state = state
            except Exception:  # metrics must never take the router down; keep the batch for the next try
                logger.exception("sending %d request records to the metrics actor failed", len(batch))
                self._pending = batch + self._pending

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()
