"""The ingress: OpenAI HTTP API and Python handle calls, both through the same priority queues.

A request holds one dispatch slot from the moment it is sent to an LLM replica until its last
byte; the router never has more requests at the replicas than they have `max_ongoing_requests`,
so the waiting happens here, in priority order, and not in Ray's FIFO handle queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from serve_app.admission import Admission, NotReady, QueueFull, QueueTimeout, Slot
from serve_app.config import SINGLE_LOOP_ENV, AppArgs
from serve_app.errors import GatewayError
from serve_app.llm_server import SSE_DONE, Head, Trailer
from serve_app.metrics_reporter import MetricsReporter
from serve_app.priority import PRIORITY_HEADER, InvalidPriority, Priority, request_priority
from serve_app.request_body import engine_body
from serve_app.request_queue import PriorityRequestQueue
from serve_app.stats import Outcome, RequestRecord

logger = logging.getLogger("ray.serve")

LLM_DEPLOYMENT = "LLMServer"
NOT_READY_RETRY_S = 5


@dataclass
class InFlight:
    """One request's accounting; `finish` runs once, however the request ends."""

    priority: Priority
    endpoint: str
    arrived: float
    on_finish: Callable[[InFlight, RequestRecord], None]
    slot: Slot | None = None
    stream: DeploymentResponseGenerator | None = None
    first_chunk_at: float | None = None
    output_tokens: int | None = None
    finished: bool = field(default=False)

    def finish(self, outcome: Outcome, kind: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if outcome != "completed" and self.stream is not None:
            self.stream.cancel()  # aborts the request in the engine, freeing its KV cache
        now = time.monotonic()
        record = RequestRecord(
            priority=self.priority.label,
            outcome=outcome,
            kind=kind,
            endpoint=self.endpoint,
            admitted=self.slot is not None,
            queue_wait_s=self.slot.queue_wait_s if self.slot else None,
            ttft_s=self.first_chunk_at - self.arrived if self.first_chunk_at else None,
            e2e_s=now - self.arrived,
            output_tokens=self.output_tokens,
        )
        self.on_finish(self, record)


class RelayResponse(StreamingResponse):
    """A stream that always settles its request: if the client leaves before the body is first read,
    the relay generator never starts and could not release the slot or abort the engine itself."""

    def __init__(self, flight: InFlight, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flight = flight

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.flight.finish("cancelled", "client_gone")  # no-op when the stream already finished


class Router:
    async def __init__(self, llm: DeploymentHandle, metrics: DeploymentHandle, args: AppArgs) -> None:
        self.llm = llm
        self.llm_stream = llm.options(stream=True)
        self.metrics = metrics
        self.args = args
        self.admission = Admission(PriorityRequestQueue(args.queue.limits(), args.queue.aging_s))
        self.reporter = MetricsReporter(self._send_records, self.router_state, args.metrics_flush_s)
        self.replicas = 0
        self._models: dict[str, Any] | None = None
        self._routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("POST", "/v1/chat/completions"): lambda r: self._http_generate(r, "chat"),
            ("POST", "/v1/completions"): lambda r: self._http_generate(r, "completions"),
            ("GET", "/v1/models"): self._http_models,
            ("GET", "/health"): self._http_health,
            ("GET", "/metrics"): self._http_prometheus,
            ("GET", "/v1/stats"): self._http_stats,
        }
        self._background = [asyncio.create_task(self._watch_capacity()), asyncio.create_task(self.reporter.run())]

    # ---- HTTP ----------------------------------------------------------------------------

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        handler = self._routes.get((request.method, path))
        try:
            if handler is None:
                known = any(p == path for _, p in self._routes)
                raise GatewayError(405 if known else 404, f"no route for {request.method} {request.url.path}")
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except Exception:
            logger.exception("unexpected error answering %s %s", request.method, path)
            return GatewayError(500, "internal error in the gateway; see the router's log").response()

    async def _http_generate(self, request: Request, endpoint: str) -> Response:
        arrived = time.monotonic()
        body = await _json_body(request)
        priority = _priority_or_400(request.headers.get(PRIORITY_HEADER), body)
        flight, head = await self._dispatch(endpoint, body, priority, arrived)
        headers = {"X-Priority": priority.label, "X-Queue-Wait-Ms": f"{flight.slot.queue_wait_s * 1000:.1f}"}
        if head.body is not None:
            return JSONResponse(head.body, status_code=head.status, headers=headers)
        return RelayResponse(flight, self._relay(flight), media_type="text/event-stream", headers=headers)

    async def _http_models(self, request: Request) -> Response:
        return JSONResponse(await self.models())

    async def _http_health(self, request: Request) -> Response:
        if self.admission.capacity == 0:
            raise GatewayError(503, "the model is still loading", retry_after_s=NOT_READY_RETRY_S)
        return JSONResponse({"status": "ok", "replicas": self.replicas, **self.router_state()})

    async def _http_prometheus(self, request: Request) -> Response:
        await self.reporter.flush()
        text = await self.metrics.prometheus.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _http_stats(self, request: Request) -> Response:
        return JSONResponse(await self.stats())

    # ---- Python handle API -----------------------------------------------------------------

    async def chat(self, body: dict[str, Any], priority: str | None = None) -> Any:
        """Non-streaming: returns the response dict. With `"stream": True` (and handle.options(stream=True)):
        yields each chunk as a dict. Errors raise GatewayError with the HTTP status it would have had."""
        return await self._handle_call("chat", body, priority)

    async def completions(self, body: dict[str, Any], priority: str | None = None) -> Any:
        return await self._handle_call("completions", body, priority)

    async def models(self) -> dict[str, Any]:
        if self._models is None:
            if self.admission.capacity == 0:
                raise GatewayError(503, "the model is still loading", retry_after_s=NOT_READY_RETRY_S)
            self._models = await self.llm.models.remote()
        return self._models

    async def stats(self) -> dict[str, Any]:
        await self.reporter.flush()
        summary = await self.metrics.summary.remote()
        summary["router"] = self.router_state()
        return summary

    async def _handle_call(self, endpoint: str, body: dict[str, Any], priority: str | None) -> Any:
        arrived = time.monotonic()
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        prio = _priority_or_400(priority, body)
        if body.get("stream"):
            return self._handle_stream(endpoint, body, prio, arrived)
        _, head = await self._dispatch(endpoint, body, prio, arrived)
        return head.body

    async def _handle_stream(
        self, endpoint: str, body: dict[str, Any], priority: Priority, arrived: float
    ) -> AsyncGenerator[dict[str, Any], None]:
        flight, _ = await self._dispatch(endpoint, body, priority, arrived)
        async for chunk in self._relay(flight):
            data = chunk.removeprefix("data: ").strip()
            if data and data != "[DONE]":
                yield json.loads(data)

    # ---- dispatch --------------------------------------------------------------------------

    async def _dispatch(
        self, endpoint: str, body: dict[str, Any], priority: Priority, arrived: float
    ) -> tuple[InFlight, Head]:
        """Queue for a slot, send to a replica, and read its Head. A JSON answer finishes the request here;
        for a stream, the caller relays the rest with `_relay`."""
        flight = InFlight(priority, endpoint, arrived, self._on_finish)
        try:
            flight.slot = await self.admission.acquire(priority)
        except QueueFull as exc:
            flight.finish("rejected", "queue_full")
            raise GatewayError(429, f"{exc}; retry later", retry_after_s=exc.retry_after_s, kind="queue_full") from None
        except QueueTimeout as exc:
            flight.finish("rejected", "queue_timeout")
            raise GatewayError(
                429, f"{exc}; retry later", retry_after_s=exc.retry_after_s, kind="queue_timeout"
            ) from None
        except NotReady as exc:
            flight.finish("rejected", "not_ready")
            raise GatewayError(503, str(exc), retry_after_s=NOT_READY_RETRY_S, kind="not_ready") from None
        except asyncio.CancelledError:
            flight.finish("cancelled", "client_gone_while_queued")
            raise
        try:
            flight.stream = self.llm_stream.generate.remote(endpoint, engine_body(body, priority))
            head: Head = await flight.stream.__anext__()
        except asyncio.CancelledError:
            flight.finish("cancelled", "client_gone")
            raise
        except Exception as exc:
            logger.exception("LLM replica failed before answering")
            flight.finish("error", "engine_error")
            raise GatewayError(500, f"the model replica failed: {type(exc).__name__}", kind="engine_error") from exc
        if head.body is None:
            return flight, head
        if head.status >= 400:
            error = GatewayError.from_body(head.status, head.body)
            flight.finish("error", error.kind)
            raise error
        flight.output_tokens = (head.body.get("usage") or {}).get("completion_tokens")
        flight.finish("completed")
        return flight, head

    async def _relay(self, flight: InFlight) -> AsyncGenerator[str, None]:
        assert flight.stream is not None
        try:
            async for item in flight.stream:
                if isinstance(item, Trailer):
                    flight.output_tokens = item.completion_tokens
                    continue
                if flight.first_chunk_at is None:
                    flight.first_chunk_at = time.monotonic()
                if item.startswith(SSE_DONE):
                    flight.finish("completed")  # the answer is whole even if the client hangs up now
                yield item
            flight.finish("completed")
        except (asyncio.CancelledError, GeneratorExit):
            flight.finish("cancelled", "client_gone")
            raise
        except Exception as exc:
            logger.exception("LLM replica failed mid-stream")
            flight.finish("error", "engine_error")
            error = GatewayError(500, f"the model replica failed mid-stream: {type(exc).__name__}")
            yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"

    def _on_finish(self, flight: InFlight, record: RequestRecord) -> None:
        if flight.slot is not None:
            self.admission.release(flight.slot)
        self.reporter.add(record)

    # ---- background ------------------------------------------------------------------------

    def router_state(self) -> dict[str, Any]:
        queue = self.admission.queue
        return {
            **{f"queued_{p.label}": queue.depth(p) for p in Priority},
            "in_flight": self.admission.in_use,
            "capacity": self.admission.capacity,
        }

    async def _send_records(self, records: list[dict[str, Any]], state: dict[str, Any]) -> None:
        await self.metrics.record.remote(records, state)

    async def _watch_capacity(self) -> None:
        """Slots = running LLM replicas x their max_ongoing_requests, re-read as the autoscaler changes them."""
        app_name = serve.get_replica_context().app_name
        per_replica = self.args.llm.autoscaling.max_ongoing_requests
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                app = status.applications.get(app_name)
                deployment = app.deployments.get(LLM_DEPLOYMENT) if app else None
                self.replicas = int(deployment.replica_states.get("RUNNING", 0)) if deployment else 0
                self.admission.set_capacity(self.replicas * per_replica)
            except Exception:
                logger.exception("could not read the LLM replica count")
            await asyncio.sleep(self.args.capacity_poll_s)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def _priority_or_400(header: str | None, body: dict[str, Any]) -> Priority:
    try:
        return request_priority(header, body)
    except InvalidPriority as exc:
        raise GatewayError(400, str(exc), param="priority") from None


RouterDeployment = serve.deployment(
    Router,
    name="Router",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    max_ongoing_requests=100_000,
)
