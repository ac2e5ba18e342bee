"""The ingress: dispatch through the shared priority queues, the relay of each answer, and the one retry.

Each Router replica serves HTTP itself on the public port (several replicas share it through
SO_REUSEPORT; `http.routes` is that surface), asks Admission for a slot, and relays the chosen LLM
replica's answer. The relay passes bytes through: one read of whatever the replica has sent, one
write to the client, so chunks that are already waiting go out as one message without any timer.
What a failure on the way leads to is decided in `policy.lifecycle`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import NO_ACCESS_LOG, SINGLE_LOOP_ENV, AppArgs
from serve_app.deployments import process_priority
from serve_app.deployments.admission_client import AdmissionClient, Grant, Held, Shape
from serve_app.errors import ErrorKind, GatewayError
from serve_app.http import relay
from serve_app.http import server as http_server
from serve_app.http.batch_routes import BatchRoutes
from serve_app.http.request_body import checked_class, engine_body, prompt_shape
from serve_app.http.routes import HttpApi
from serve_app.observability import access_log
from serve_app.observability.reporter import MetricsReporter
from serve_app.observability.stats import Outcome, RequestRecord
from serve_app.observability.tracing import RequestTrace, RequestTracer
from serve_app.policy.api_keys import KeyPolicy
from serve_app.policy.lifecycle import Failure, Next, Stage, after_failure
from serve_app.policy.priority import Priority

logger = logging.getLogger("ray.serve")

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
JSON_HEADERS = {"content-type": "application/json"}


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class InFlight:
    """One request's accounting; `finish` runs once, however the request ends."""

    priority: Priority
    endpoint: str
    arrived: float
    on_finish: Callable[[InFlight, RequestRecord], None]
    tenant: str | None = None  # the API key's name, or the body's `user`: for fair shares and rate limits
    request_id: str = field(default_factory=_new_id)  # a new one each time it queues again
    stage: Stage = Stage.QUEUED
    queue_wait_s: float | None = None
    granted_at: float | None = None
    upstream: aiohttp.ClientResponse | None = None
    replica_url: str | None = None  # where the upstream was sent
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    first_chunk_at: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None  # as the engine counted them, from the usage
    shape: Shape | None = None  # request_body.prompt_shape, for placing it
    client_wants_usage: bool = True
    preempt_asked: bool = False  # the Router closed the upstream on purpose, to run it again later
    preemptions: int = 0
    retried: bool = False  # sent again once after a replica failed before the first byte
    error_kind: ErrorKind | None = None  # the stream carried the engine's error event
    model: str | None = None  # the body's `model`, for the access log and the trace
    trace: RequestTrace | None = None  # its spans, when tracing is on
    on_preempt: Callable[[], None] | None = None  # a batch line: cut it, whatever its stage (its runner retries)

    @property
    def admitted(self) -> bool:
        return self.granted_at is not None

    @property
    def gone_kind(self) -> ErrorKind:
        """What a client that hangs up now is counted as."""
        return ErrorKind.CLIENT_GONE if self.admitted else ErrorKind.CLIENT_GONE_WHILE_QUEUED

    def granted(self, grant: Grant, body: dict[str, Any]) -> None:
        self.stage = Stage.SENT
        self.granted_at = time.monotonic()
        self.queue_wait_s = (self.queue_wait_s or 0.0) + grant.queue_wait_s
        self.body = body
        self.replica_url = grant.url
        if self.trace is not None:
            self.trace.granted(grant.queue_wait_s, grant.url, grant.url + ENDPOINT_PATHS[self.endpoint])

    def requeued(self, retry: bool) -> None:
        """Its slot given back: it queues again under a new id; `retry` spends its one retry."""
        self.retried = self.retried or retry
        self.preempt_asked = False  # an ask for the old id, come in while it was being given up
        self.request_id = _new_id()
        if self.trace is not None:
            self.trace.requeued(retry, self.request_id, self.upstream.status if self.upstream is not None else None)
        self.stage = Stage.QUEUED
        if self.upstream is not None:
            self.upstream.close()  # a no-op when it already broke
        self.upstream = None

    def finish(self, outcome: Outcome, kind: ErrorKind | None = None) -> None:
        if self.stage is Stage.FINISHED:
            return
        self.stage = Stage.FINISHED
        if self.upstream is not None:
            if outcome == "completed":
                self.upstream.release()  # the connection goes back to the pool
            else:
                self.upstream.close()  # the replica sees the hang-up and aborts the engine request
        record = RequestRecord(
            priority=self.priority.label,
            outcome=outcome,
            kind=kind,
            endpoint=self.endpoint,
            admitted=self.admitted,
            queue_wait_s=self.queue_wait_s,
            ttft_s=self.first_chunk_at - self.arrived if self.first_chunk_at else None,
            e2e_s=time.monotonic() - self.arrived,
            output_tokens=self.output_tokens,
            preemptions=self.preemptions,
            retried=self.retried,
        )
        if self.trace is not None:
            self.trace.finish(record)
        self.on_finish(self, record)


class Router:
    """Dispatch, relay and retry for one Router replica; no Ray of its own, so tests run it in-process.
    `llm` and `metrics` are the LLMServer and Metrics deployments' handles (or objects that answer alike)."""

    def __init__(self, admission: AdmissionClient, llm: Any, metrics: Any, args: AppArgs, batches: Any = None) -> None:
        """`batches`: the Batches deployment's handle, for the Batch API's routes (None: the API is off)."""
        self.admission = admission
        self.llm = llm
        self.metrics = metrics
        self.args = args
        self.reporter = MetricsReporter(self._send_records, args.metrics_flush_s)
        self.router_id = _new_id()
        batch_routes = BatchRoutes(batches, args.batch.max_file_bytes, args.http.max_body_bytes)
        self.http = HttpApi(self, args.auth.resolved(), args.http.max_body_bytes, batch_routes)
        self.tracer = RequestTracer(args.tracing) if args.tracing.enabled else None
        self.access_log = args.access_log
        if self.access_log:
            access_log.enable()
        self._flights: dict[str, InFlight] = {}  # holding a slot, by request id: for preemption and shutdown
        # No total timeout: a stream lasts as long as generation does. Unlimited pool: admission bounds it.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        self.admission.attach(self.router_id, self._running)
        # The standing call: preemption asks, and the heartbeat that renews this Router's lease on its slots.
        self._background = [
            asyncio.ensure_future(self.reporter.run()),
            asyncio.ensure_future(self.admission.answer_preemptions(self.router_id, self._preempt)),
        ]
        self._closing = False  # past the drain timeout: what is still running is cut, not retried

    # ---- dispatch ------------------------------------------------------------------------------

    def open_flight(
        self,
        endpoint: str,
        body: dict[str, Any],
        priority: str | None,
        key: KeyPolicy | None,
        arrived: float,
        headers: Mapping[str, str] | None = None,
    ) -> InFlight:
        """A checked request's accounting (`request_body.checked_class`: 400 for a bad role or class), and its
        trace when tracing is on: under the W3C `traceparent` in `headers` if there is one, else a new one."""
        wanted = checked_class(endpoint, body, priority, key)
        flight = InFlight(wanted, endpoint, arrived, self._on_finish, _tenant(key, body), model=_model(body))
        flight.shape = prompt_shape(endpoint, body)
        if self.tracer is not None:
            flight.trace = self.tracer.start(
                headers, arrived, endpoint, wanted.label, flight.model, flight.tenant, flight.request_id
            )
        return flight

    async def dispatch(self, flight: InFlight, body: dict[str, Any], front: bool = False) -> aiohttp.ClientResponse:
        """Queue for a slot, send to its replica, and return the replica's response once its headers are in.
        A rejection finishes the request and raises GatewayError. `front`: queue again at the head of its class."""
        grant = await self._acquire(flight, body, front)
        try:
            payload = _engine_payload(flight, body)
        except Exception as exc:  # it holds a slot: finished here, or the slot would never be given back
            flight.finish("error", exc.kind if isinstance(exc, GatewayError) else ErrorKind.INTERNAL)
            raise
        url = grant.url + ENDPOINT_PATHS[flight.endpoint]
        headers = JSON_HEADERS if flight.trace is None else flight.trace.inject(JSON_HEADERS)
        try:
            flight.upstream = await self.session.post(url, data=payload, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            await self.admission.report_failure(grant.url)  # before a retry, so that it goes elsewhere
            if self._next(flight, Failure.UNREACHABLE) is Next.RETRY:  # nothing was sent to the client
                logger.warning("LLM replica at %s unreachable (%s); retrying once", grant.url, type(exc).__name__)
                return await self._queue_again(flight, retry=True)
            flight.finish("error", ErrorKind.ENGINE_UNREACHABLE)
            raise GatewayError(
                503,
                f"the model replica could not be reached: {type(exc).__name__}",
                retry_after_s=1,
                kind=ErrorKind.ENGINE_UNREACHABLE,
            ) from exc
        except BaseException:
            flight.finish("cancelled", ErrorKind.CLIENT_GONE)
            raise
        if flight.upstream.status >= 500 and self._next(flight, Failure.ENGINE_FAILED) is Next.RETRY:
            logger.warning("LLM replica at %s answered %d; retrying once", grant.url, flight.upstream.status)
            flight.upstream.close()
            await self.admission.report_failure(grant.url)  # a dead engine takes no more
            return await self._queue_again(flight, retry=True)
        if flight.trace is not None:
            flight.trace.answered(flight.upstream.status)
        return flight.upstream  # a 5xx after the retry is passed through as the engine wrote it

    async def _acquire(self, flight: InFlight, body: dict[str, Any], front: bool) -> Grant:
        try:
            grant = await self.admission.acquire(
                flight.request_id, flight.priority, self.router_id, front, flight.tenant, flight.shape
            )
        except GatewayError as exc:
            flight.finish("rejected" if exc.status in (429, 503) else "error", exc.kind)
            raise GatewayError(exc.status, exc.message, retry_after_s=exc.retry_after_s, kind=exc.kind) from None
        except BaseException as exc:
            self.admission.release(flight.request_id)  # the grant may be on its way: Admission drops it
            if isinstance(exc, asyncio.CancelledError):
                flight.finish("cancelled", ErrorKind.CLIENT_GONE_WHILE_QUEUED)
            else:
                flight.finish("error", ErrorKind.ADMISSION_FAILED)
            raise
        flight.granted(grant, body)
        self._flights[flight.request_id] = flight
        return grant

    def _next(self, flight: InFlight, failure: Failure, shutting_down: bool = False) -> Next:
        """`shutting_down`: only a stream cut by the Router's own shutdown is not sent again; a dispatch that
        fails while the Router drains is still retried, as the request has no answer yet."""
        return after_failure(flight.stage, failure, flight.retried, shutting_down)

    async def _queue_again(self, flight: InFlight, retry: bool = False) -> aiohttp.ClientResponse:
        """Gives back the slot, queues again at the head of its class under a new id, and sends once granted."""
        self._flights.pop(flight.request_id, None)
        self.admission.release(flight.request_id)
        flight.requeued(retry)
        return await self.dispatch(flight, flight.body, front=True)

    async def whole_answer(self, flight: InFlight, upstream: aiohttp.ClientResponse) -> tuple[int, bytes]:
        """A non-streamed answer, read whole and counted: its status and its bytes."""
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._closing:
                flight.finish("error", ErrorKind.SHUTDOWN)
                raise _shut_down() from exc
            flight.finish("error", ErrorKind.ENGINE_ERROR)
            raise GatewayError(502, f"the model replica failed while answering: {type(exc).__name__}") from exc
        if upstream.status >= 400:
            flight.finish("error", relay.error_kind(upstream.status))
        else:
            flight.output_tokens = relay.completion_tokens(payload)
            flight.prompt_tokens = relay.prompt_tokens(payload)
            flight.finish("completed")
        return upstream.status, payload

    async def answer_line(self, endpoint: str, body: dict[str, Any], owner: str) -> tuple[int, Any, str]:
        """A Batch API line, at the batch class and with `owner`'s fair share: (status, answer, request id).
        Refusals raise GatewayError. A preemption cancels the calling task: nobody has seen a byte of a batch
        line, so its runner just runs it again later."""
        flight = self.open_flight(endpoint, body, None, None, time.monotonic())
        flight.priority, flight.tenant = Priority.BATCH, owner or None
        task = asyncio.current_task()
        flight.on_preempt = task.cancel if task is not None else None
        try:
            upstream = await self.dispatch(flight, body)
            status, payload = await self.whole_answer(flight, upstream)
        except asyncio.CancelledError:
            flight.finish("cancelled", flight.gone_kind)  # gives the slot back; the engine aborts the request
            raise
        return status, relay.json_or_text(payload), flight.request_id

    # ---- relay ---------------------------------------------------------------------------------

    async def relay(self, flight: InFlight, upstream: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """Bytes through: each read takes all that has arrived, so a backed-up stream sends fewer, larger writes.
        Until its first byte, a preempted or failed stream queues again at the head of its class."""
        while True:
            flight.stage = Stage.STREAMING
            try:
                async for data in upstream.content.iter_any():
                    if relay.USAGE in data:
                        flight.prompt_tokens = relay.prompt_tokens(data) or flight.prompt_tokens
                        data, tokens = relay.take_usage(data, flight.client_wants_usage)
                        flight.output_tokens = tokens if tokens is not None else flight.output_tokens
                    if relay.ERROR_EVENT in data:
                        kind = relay.engine_error_kind(data)
                        if kind is ErrorKind.ENGINE_ERROR:
                            if self._next(flight, Failure.ENGINE_FAILED) is Next.RETRY:  # the client saw nothing
                                reason = "an error event before the first byte"
                                break
                            self.admission.report_failure_soon(flight.replica_url)
                        flight.error_kind = kind
                    if flight.stage is Stage.STREAMING:
                        flight.first_chunk_at = time.monotonic()
                        flight.stage = Stage.ANSWERING
                        if flight.granted_at is not None:  # its prefill is done: its replica's load drops
                            self.admission.first_token(flight.request_id, flight.first_chunk_at - flight.granted_at)
                    if data.endswith(relay.DONE):
                        yield data
                        # The answer is whole (or its error told) even if the client hangs up now.
                        flight.finish("completed" if flight.error_kind is None else "error", flight.error_kind)
                        return
                    if data:
                        yield data
                else:
                    reason = "the stream ended before [DONE]"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                reason = type(exc).__name__
            failure = Failure.PREEMPTED if flight.preempt_asked else Failure.ENGINE_FAILED
            flight.preempt_asked = False
            step = self._next(flight, failure, self._closing)
            if step is Next.FAIL:
                break
            if step is Next.RESTART:
                flight.preemptions += 1
            else:
                logger.warning("LLM replica failed before the first byte (%s); retrying once", reason)
                flight.retried = True  # before the report: a client that leaves meanwhile is counted retried
                await self.admission.report_failure(flight.replica_url)  # so that the retry goes elsewhere
            try:
                upstream = await self._restart(flight, retry=step is Next.RETRY)
            except GatewayError as exc:  # the finish is counted; the client learns why in the stream
                yield relay.error_event(exc)
                return
        if self._closing:  # cut by the Router's own shutdown, past its drain timeout
            error = _shut_down()
        else:
            if failure is Failure.ENGINE_FAILED:  # not a preemption that came after a byte went out
                self.admission.report_failure_soon(flight.replica_url)
            reason = "preempted after its first byte" if failure is Failure.PREEMPTED else reason
            logger.warning("LLM replica failed mid-stream: %s", reason)
            error = GatewayError(502, f"the model replica failed mid-stream: {reason}", kind=ErrorKind.ENGINE_ERROR)
        flight.finish("error", error.kind)
        yield relay.error_event(error)

    async def _restart(self, flight: InFlight, retry: bool) -> aiohttp.ClientResponse:
        upstream = await self._queue_again(flight, retry)
        if upstream.content_type != "text/event-stream":  # an error answer from the engine, whole
            payload = await upstream.read()
            flight.finish("error", relay.error_kind(upstream.status))
            raise GatewayError.from_body(upstream.status, relay.json_or_text(payload))
        return upstream

    # ---- replicas' failures and preemption -----------------------------------------------------

    @property
    def holding_slots(self) -> int:
        """This Router's requests that hold a slot now."""
        return len(self._flights)

    def _running(self) -> list[Held]:
        """What this Router runs, for an Admission that restarted and lost count of it."""
        return [
            (f.request_id, int(f.priority), f.replica_url, f.tenant, f.shape, f.first_chunk_at is None)
            for f in self._flights.values()
            if f.replica_url is not None
        ]

    def _preempt(self, asked: list[str]) -> None:
        """Admission's asks to give up a slot for a waiting high request. Only a stream that has not sent
        its first byte gives it up; any other ask is ignored, and Admission stops counting on it."""
        for request_id in asked:
            flight = self._flights.get(request_id)
            if flight is not None and flight.on_preempt is not None and flight.stage is Stage.SENT:
                flight.preempt_asked = True
                flight.on_preempt()
            elif flight is not None and flight.stage.preemptible and flight.upstream is not None:
                flight.preempt_asked = True
                flight.upstream.close()  # vLLM's server sees the hang-up and aborts the request

    # ---- accounting and shutdown ---------------------------------------------------------------

    def _on_finish(self, flight: InFlight, record: RequestRecord) -> None:
        if flight.admitted:
            self._flights.pop(flight.request_id, None)
            self.admission.release(flight.request_id, flight.output_tokens, flight.prompt_tokens)
        self.reporter.add(record)
        if self.access_log:
            access_log.write(record, flight)

    async def _send_records(self, records: list[dict[str, Any]]) -> None:
        await self.metrics.record.remote(records)

    async def close(self) -> None:
        """Past the drain: ends every answer still running with an error, counted, then stops."""
        self._closing = True
        for flight in list(self._flights.values()):
            if flight.upstream is not None:
                flight.upstream.close()
        deadline = time.monotonic() + 5
        while self._flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._background:
            task.cancel()
        await self.admission.flush(timeout_s=5)  # the last releases: else their replicas drain for nothing
        await self.reporter.flush()  # the last requests' records
        await self.session.close()
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # the last spans; it blocks on their export


class RouterReplica(Router):
    """The Router deployment: a Router whose HTTP surface listens on the public port."""

    async def __init__(
        self,
        admission: DeploymentHandle,
        llm: DeploymentHandle,
        metrics: DeploymentHandle,
        args: AppArgs,
        batches: DeploymentHandle | None = None,
    ) -> None:
        process_priority.restore_for_process("Router")
        super().__init__(AdmissionClient(admission), llm, metrics, args, batches)
        self._server = None
        if args.http.port:
            sock = http_server.bind(args.http.host, args.http.port)
            self._server = await http_server.start(self.http, sock)

    # ---- the handle API ------------------------------------------------------------------------

    async def chat(self, body: dict[str, Any], priority: str | None = None) -> Any:
        """Non-streaming: returns the response dict. With `"stream": True` (and handle.options(stream=True)):
        yields each chunk as a dict. Errors raise GatewayError with the HTTP status it would have had."""
        return await self._handle_call("chat", body, priority)

    async def completions(self, body: dict[str, Any], priority: str | None = None) -> Any:
        return await self._handle_call("completions", body, priority)

    async def _handle_call(self, endpoint: str, body: dict[str, Any], priority: str | None) -> Any:
        arrived = time.monotonic()
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        flight = self.open_flight(endpoint, body, priority, None, arrived)
        try:
            upstream = await self.dispatch(flight, body)
        except asyncio.CancelledError:
            flight.finish("cancelled", flight.gone_kind)
            raise
        if upstream.content_type == "text/event-stream":
            return self._handle_stream(flight, upstream)
        status, payload = await self.whole_answer(flight, upstream)
        answer = json.loads(payload) if status < 400 else relay.json_or_text(payload)
        if status >= 400:
            raise GatewayError.from_body(status, answer)
        return answer

    async def _handle_stream(
        self, flight: InFlight, upstream: aiohttp.ClientResponse
    ) -> AsyncGenerator[dict[str, Any], None]:
        events = relay.EventSplitter()
        try:
            async for data in self.relay(flight, upstream):
                for event in events.feed(data):
                    yield event
        finally:
            flight.finish("cancelled", ErrorKind.CLIENT_GONE)

    async def models(self) -> dict[str, Any]:
        return await self.http.models()

    async def stats(self) -> dict[str, Any]:
        return await self.http.stats()

    # ---- Ray Serve hooks -----------------------------------------------------------------------

    async def __call__(self, scope_or_request: Any, receive: Any = None, send: Any = None) -> Any:
        """Ray Serve's ingress callable, for a gateway run behind Ray's own proxy (`http.port: 0`)."""
        if receive is None:
            return await self.http.respond(scope_or_request)
        await self.http(scope_or_request, receive, send)

    async def __del__(self) -> None:
        """On shutdown or downscale: stop accepting connections, let the requests already here finish (for up
        to `drain_timeout_s`; queued ones get their slot or a 503 once the replicas drain), then close."""
        if self._server is not None:
            await http_server.drain(self._server, self.args.drain_timeout_s)
        await self.close()


def _engine_payload(flight: InFlight, body: dict[str, Any]) -> bytes:
    """The body the engine gets, as UTF-8 as the engine reads it: a lone surrogate (a valid JSON escape but
    invalid text) is a 400. A stream always asks for the final usage event: the Router counts the tokens in
    it, and drops it if the client did not ask for it."""
    sent = engine_body(body, flight.priority)
    if sent.get("stream"):
        options = sent.get("stream_options") or {}
        flight.client_wants_usage = bool(options.get("include_usage"))
        sent["stream_options"] = {**options, "include_usage": True}
    try:
        return json.dumps(sent, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise GatewayError(400, "the request contains text that is not valid Unicode (a lone surrogate)") from None


def _shut_down() -> GatewayError:
    """For an answer still running when the Router stops past its drain timeout."""
    return GatewayError(503, "the gateway shut down before the answer was complete", kind=ErrorKind.SHUTDOWN)


def _model(body: dict[str, Any]) -> str | None:
    """The model a request names, for its trace and the access log; whatever a client sends, kept short."""
    model = body.get("model")
    return model[:200] if isinstance(model, str) else None


def _tenant(key: KeyPolicy | None, body: dict[str, Any]) -> str | None:
    """Whose request, for fair shares within a class and a key's rate limits: the API key's name when
    keys are on (a client cannot claim another's), else OpenAI's `user` field when given."""
    if key is not None:
        return key.name
    user = body.get("user")
    return f"user:{user}"[:200] if isinstance(user, str) and user else None


ROUTER_ACTOR_OPTIONS = {"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}}

RouterDeployment = serve.deployment(
    RouterReplica,
    name="Router",
    ray_actor_options=ROUTER_ACTOR_OPTIONS,
    max_ongoing_requests=100_000,
    logging_config=NO_ACCESS_LOG,
)
