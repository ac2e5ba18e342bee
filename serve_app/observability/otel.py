"""Mirrors each finished request into OpenTelemetry instruments, for collectors that speak OTLP."""

from __future__ import annotations

from typing import Any

from serve_app.observability.stats import RequestRecord


class OtelBridge:
    def __init__(self, exporter: str, export_interval_ms: int = 10_000, reader: Any = None) -> None:
        """`reader` replaces the exporter's periodic reader (tests pass an in-memory one)."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        if reader is None:
            if exporter == "otlp":
                try:
                    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
                except ImportError as exc:
                    raise RuntimeError("otel_exporter: otlp needs `pip install opentelemetry-exporter-otlp`") from exc
                metric_exporter: Any = OTLPMetricExporter()
            else:
                metric_exporter = ConsoleMetricExporter()
            reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=export_interval_ms)
        self.provider = MeterProvider(metric_readers=[reader])
        meter = self.provider.get_meter("serve_app.gateway")
        self.requests = meter.create_counter("gateway.requests", description="Requests that ended")
        self.latency = {
            "queue_wait_s": meter.create_histogram("gateway.queue_wait", unit="s"),
            "ttft_s": meter.create_histogram("gateway.time_to_first_token", unit="s"),
            "e2e_s": meter.create_histogram("gateway.e2e_latency", unit="s"),
            "output_tokens": meter.create_histogram("gateway.output_tokens", unit="{token}"),
        }

    def record(self, record: RequestRecord) -> None:
        attributes = {"priority": record.priority, "outcome": record.outcome}
        self.requests.add(1, {**attributes, "kind": record.kind.value if record.kind else ""})
        for name, instrument in self.latency.items():
            value = getattr(record, name)
            if value is not None:
                instrument.record(value, attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()
