"""Mirrors each finished request into OpenTelemetry instruments, for collectors that speak OTLP.

The instruments and what each records come from `catalog`, as the Prometheus side's do."""

from __future__ import annotations

from typing import Any

from serve_app.observability import catalog
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
        self.requests = meter.create_counter(catalog.REQUESTS.otel, description=catalog.REQUESTS.help)
        self.distributions = [
            (figure, meter.create_histogram(figure.otel, unit=figure.unit, description=figure.help))
            for figure in catalog.DISTRIBUTIONS
        ]

    def record(self, record: RequestRecord) -> None:
        attributes = {"priority": record.priority, "outcome": record.outcome}
        self.requests.add(1, {**attributes, "kind": record.kind.value if record.kind else ""})
        for figure, instrument in self.distributions:
            value = getattr(record, figure.field)
            if value is not None and (record.outcome == "completed" or not figure.completed_only):
                instrument.record(value, attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()
