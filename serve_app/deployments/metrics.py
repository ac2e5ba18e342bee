"""The single Metrics replica: collects every finished request and serves the figures."""

from __future__ import annotations

from typing import Any

from ray import serve

from serve_app.config import NO_ACCESS_LOG, ON_HEAD_NODE
from serve_app.observability.otel import OtelBridge
from serve_app.observability.stats import GatewayStats, RequestRecord


class Metrics:
    """Async methods, so every update runs on the replica's one event loop and needs no lock."""

    def __init__(self, otel_exporter: str = "none") -> None:
        self.stats = GatewayStats()
        self.otel = OtelBridge(otel_exporter) if otel_exporter != "none" else None

    async def record(self, records: list[dict[str, Any]]) -> int:
        parsed = [RequestRecord(**r) for r in records]
        self.stats.add_many(parsed)
        if self.otel:
            for record in parsed:
                self.otel.record(record)
        return len(parsed)

    async def summary(self, gateway_state: dict[str, Any]) -> dict[str, Any]:
        """`gateway_state` is the Admission deployment's live picture: queue depths, slots, replicas."""
        return self.stats.summary(gateway_state)

    async def prometheus(self, gateway_state: dict[str, Any]) -> str:
        return self.stats.prometheus(gateway_state)

    def __del__(self) -> None:
        if self.otel:
            self.otel.shutdown()


MetricsDeployment = serve.deployment(
    Metrics,
    name="Metrics",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "resources": ON_HEAD_NODE},
    max_ongoing_requests=1000,
    logging_config=NO_ACCESS_LOG,
)
