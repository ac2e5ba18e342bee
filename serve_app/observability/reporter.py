"""Router-side batching of finished requests, so recording a request costs a list append."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.observability.stats import RequestRecord

logger = logging.getLogger("ray.serve")

Send = Callable[[list[dict[str, Any]]], Awaitable[None]]


class MetricsReporter:
    def __init__(self, send: Send, flush_s: float) -> None:
        self._send = send
        self._flush_s = flush_s
        self._pending: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()  # a flush returns only once everything added before it has landed

    def add(self, record: RequestRecord) -> None:
        self._pending.append(record.to_dict())

    async def flush(self) -> None:
        """Sends only when there is news."""
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []
            try:
                await self._send(batch)
            except BaseException as exc:  # keep the batch for the next try, cancelled or failed
                self._pending = batch + self._pending
                if not isinstance(exc, Exception):
                    raise
                # metrics must never take the router down
                logger.exception("sending %d request records to the metrics actor failed", len(batch))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()
