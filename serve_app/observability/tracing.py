"""OpenTelemetry traces of requests: a root span per request in the Router, one child span per stage, and the
W3C trace context passed on to the LLM replica, so that vLLM's own span joins the same trace.

All of OpenTelemetry's tracing is here. The Router holds a `RequestTracer` only when `tracing.enabled`, and
each request a `RequestTrace` or None: with tracing off, a stage costs one `is None` check. A trace costs a
few spans per request and nothing per token; the first byte is an event stamped when the request ends.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, format_trace_id, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serve_app.config import TracingConfig
from serve_app.observability.stats import RequestRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

ROOT = "gateway.request"
ADMISSION = "gateway.admission"  # queued until granted a slot; again after each retry or preemption
DISPATCH = "gateway.dispatch"  # sent to the replica until its response headers are in
RELAY = "gateway.relay"  # the answer, from its headers to its end (streamed or whole)
FIRST_BYTE = "first_byte"  # an event on the relay span: the first chunk of a stream

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent and tracestate, nothing else


class RequestTracer:
    """The Router's tracer provider, its batch processor and OTLP/HTTP exporter, and the sampler
    ParentBased(TraceIdRatio): a client's traceparent decides for its trace, `sample_ratio` for new ones."""

    def __init__(self, config: TracingConfig) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError("tracing needs `pip install opentelemetry-exporter-otlp-proto-http`") from exc
        # A provider of our own, not the global one, which other OpenTelemetry users in the process may set.
        self.provider: TracerProvider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint)))
        self._tracer = self.provider.get_tracer("serve_app.gateway")

    def start(
        self,
        headers: Mapping[str, str] | None,
        arrived: float,
        endpoint: str,
        priority: str,
        model: str | None,
        tenant: str | None,
        request_id: str,
    ) -> RequestTrace:
        """The root span, under the client's traceparent if it sent one (else a new trace), started when the
        request arrived (`arrived`: time.monotonic()); it queues from now on, so admission starts too."""
        parent = _PROPAGATOR.extract(headers) if headers is not None else Context()
        start_ns = time.time_ns() - int((time.monotonic() - arrived) * 1e9)
        attributes: dict[str, Any] = {"gateway.priority": priority, "gateway.endpoint": endpoint}
        if model is not None:
            attributes["gen_ai.request.model"] = model
        if tenant is not None:
            attributes["gateway.tenant"] = tenant
        root = self._tracer.start_span(
            ROOT, context=parent, kind=SpanKind.SERVER, attributes=attributes, start_time=start_ns
        )
        return RequestTrace(self._tracer, root, start_ns, priority, request_id)

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        """Blocks until the spans ended so far are exported: call it off the event loop."""
        return self.provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Exports what is left and stops the exporter's thread; blocks, so off the event loop too."""
        self.provider.shutdown()


class RequestTrace:
    """One request's spans: the root, and the child span of the stage it is in. Stages follow each other
    (admission, dispatch, relay; admission again on a retry or a preemption), so one child is open at a time;
    `finish` ends it and the root, once (the Router's `InFlight.finish` runs once)."""

    __slots__ = ("_tracer", "_root", "_parent", "_start_ns", "_priority", "_stage", "_stage_name")

    def __init__(self, tracer: Tracer, root: Span, start_ns: int, priority: str, request_id: str) -> None:
        self._tracer = tracer
        self._root = root
        self._parent = set_span_in_context(root, Context())
        self._start_ns = start_ns
        self._priority = priority
        self._stage: Span | None = None
        self._stage_name = ""
        self._queued(request_id, front=False)

    @property
    def trace_id(self) -> str:
        return format_trace_id(self._root.get_span_context().trace_id)

    def _next(self, name: str, kind: SpanKind, attributes: dict[str, Any]) -> None:
        if self._stage is not None:
            self._stage.end()
        self._stage_name = name
        self._stage = self._tracer.start_span(name, context=self._parent, kind=kind, attributes=attributes)

    def granted(self, queue_wait_s: float, replica_url: str, url: str) -> None:
        """Admission ends with its wait and replica; dispatch to `url` starts."""
        if self._stage is None:  # finished already: a trace never fails a request
            return
        self._stage.set_attributes({"gateway.queue_wait_s": queue_wait_s, "gateway.replica": replica_url})
        self._next(
            DISPATCH,
            SpanKind.CLIENT,
            {"gateway.replica": replica_url, "url.full": url, "http.request.method": "POST"},
        )

    def inject(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`headers` plus the current stage's (the dispatch's) traceparent: vLLM's span becomes its child."""
        carrier = dict(headers)
        if self._stage is not None:
            _PROPAGATOR.inject(carrier, context=set_span_in_context(self._stage, Context()))
        return carrier

    def answered(self, status: int) -> None:
        """The replica's headers are in: dispatch ends with its status, the relay of the answer starts."""
        if self._stage is None:
            return
        self._stage.set_attribute("http.response.status_code", status)
        self._next(RELAY, SpanKind.INTERNAL, {})

    def requeued(self, retry: bool, request_id: str, status: int | None) -> None:
        """The stage that failed (`retry`) or was preempted ends; admission starts again under the new id.
        `status`: the replica's answer, if it gave one (a 5xx that a dispatch is retried for)."""
        if self._stage is None:
            return
        if status is not None and self._stage_name == DISPATCH:
            self._stage.set_attribute("http.response.status_code", status)
        self._stage.set_attribute("gateway.requeued", "retry" if retry else "preempted")
        if retry:
            self._stage.set_status(Status(StatusCode.ERROR, "failed before the first byte; retried"))
        self._queued(request_id, front=True)

    def _queued(self, request_id: str, front: bool) -> None:
        attributes = {"gateway.priority": self._priority, "gateway.request_id": request_id, "gateway.front": front}
        self._next(ADMISSION, SpanKind.INTERNAL, attributes)

    def finish(self, record: RequestRecord) -> None:
        """Ends the open stage and the root with how the request ended."""
        ended: dict[str, Any] = {"gateway.outcome": record.outcome}
        if record.kind is not None:
            ended["gateway.error_kind"] = record.kind.value
        if record.output_tokens is not None:
            ended["gen_ai.usage.output_tokens"] = record.output_tokens
        status = Status(StatusCode.ERROR, ended.get("gateway.error_kind")) if record.outcome == "error" else None
        stage, self._stage = self._stage, None
        if stage is not None:
            if self._stage_name == RELAY and record.ttft_s is not None:
                stage.add_event(FIRST_BYTE, timestamp=self._start_ns + int(record.ttft_s * 1e9))
            stage.set_attributes(ended)
            if status is not None:
                stage.set_status(status)
            stage.end()
        ended.update(
            {
                "gateway.retried": record.retried,
                "gateway.preemptions": record.preemptions,
                "gateway.admitted": record.admitted,
            }
        )
        if record.queue_wait_s is not None:
            ended["gateway.queue_wait_s"] = record.queue_wait_s
        if record.ttft_s is not None:
            ended["gateway.ttft_s"] = record.ttft_s
        self._root.set_attributes(ended)
        if status is not None:
            self._root.set_status(status)
        self._root.end()
