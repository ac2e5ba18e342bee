"""The ingress: OpenAI HTTP API and Python handle calls, both through the shared priority queues.

Each Router replica serves HTTP itself on the public port (several replicas share it through
SO_REUSEPORT), asks the Admission deployment for a slot, and relays the chosen LLM replica's
answer. The relay passes bytes through: one read of whatever the replica has sent, one write to
the client, so chunks that are already waiting go out as one message without any timer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from serve_app.config import NO_ACCESS_LOG, SINGLE_LOOP_ENV, AppArgs
from serve_app.deployments import process_priority
from serve_app.deployments.admission import NOT_READY_RETRY_S, AdmissionClient
from serve_app.errors import GatewayError
from serve_app.http import server as http_server
from serve_app.http.request_body import InvalidBody, check_chat_roles, engine_body
from serve_app.observability.reporter import MetricsReporter
from serve_app.observability.stats import Outcome, RequestRecord
from serve_app.policy.api_keys import KeyPolicy, KeyRing, bearer
from serve_app.policy.priority import PRIORITY_HEADER, InvalidPriority, Priority, parse_priority, request_priority

logger = logging.getLogger("ray.serve")

ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
DONE = b"data: [DONE]\n\n"
USAGE = b'"usage":{'  # only vLLM's final usage chunk has a usage object in a stream
ERROR_EVENT = b'data: {"error"'  # vLLM ends a stream that failed inside its server with one, then [DONE]
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
# Shorter answers are mostly prefill: they would teach the adaptive limit little but noise.
MIN_SAMPLE_TOKENS = 8


@dataclass
class InFlight:
    """One request's accounting; `finish` runs once, however the request ends."""

    priority: Priority
    endpoint: str
    arrived: float
    on_finish: Callable[[InFlight, RequestRecord], None]
    tenant: str | None = None  # the API key's name, or the body's `user`: for fair shares and rate limits
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queue_wait_s: float | None = None
    admitted: bool = False
    granted_at: float | None = None
    upstream: aiohttp.ClientResponse | None = None
    replica_url: str | None = None  # where the upstream was sent
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    first_chunk_at: float | None = None
    output_tokens: int | None = None
    client_wants_usage: bool = True
    relaying: bool = False  # the response is a stream that the Router is reading
    preempted: bool = False  # the Router closed the upstream on purpose, to run it again later
    preemptions: int = 0
    retried: bool = False  # sent again once after a replica failed before the first byte
    error_kind: str | None = None  # the stream carried vLLM's error event
    finished: bool = False

    @property
    def per_token_s(self) -> float | None:
        """Service time (slot granted to last byte) per output token, which teaches the replica's adaptive
        limit. Not first-to-last chunk: when the relay falls behind, a whole stream can arrive in one read,
        and that span says nothing about the engine."""
        if self.granted_at is None or not self.output_tokens or self.output_tokens < MIN_SAMPLE_TOKENS:
            return None
        return (time.monotonic() - self.granted_at) / self.output_tokens

    def finish(self, outcome: Outcome, kind: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
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
        self.on_finish(self, record)


class Router:
    async def __init__(
        self, admission: DeploymentHandle, llm: DeploymentHandle, metrics: DeploymentHandle, args: AppArgs
    ) -> None:
        process_priority.restore_for_process("Router")
        self.admission = AdmissionClient(admission)
        self.llm = llm
        self.metrics = metrics
        self.args = args
        self.reporter = MetricsReporter(self._send_records, args.metrics_flush_s)
        self.router_id = uuid.uuid4().hex
        self.keys = KeyRing(
            {
                key: KeyPolicy(
                    c.name, parse_priority(c.max_priority), c.requests_per_s, c.output_tokens_per_min, c.admin
                )
                for key, c in args.auth.resolved().items()
            }
        )
        self._flights: dict[str, InFlight] = {}  # admitted and not finished, by request id: for preemption
        self._reports: set[asyncio.Future[None]] = set()
        self._models: dict[str, Any] | None = None
        self._routes: dict[tuple[str, str], Callable[[Request], Awaitable[Response]]] = {
            ("POST", "/v1/chat/completions"): lambda r: self._http_generate(r, "chat"),
            ("POST", "/v1/completions"): lambda r: self._http_generate(r, "completions"),
            ("GET", "/v1/models"): self._http_models,
            ("GET", "/health"): self._http_health,
            ("GET", "/metrics"): self._http_prometheus,
            ("GET", "/v1/stats"): self._http_stats,
        }
        self._admin_paths = {"/metrics", "/v1/stats"}
        self._open_paths = {"/health"}  # load balancers and probes carry no key
        # No total timeout: a stream lasts as long as generation does. Unlimited pool: admission bounds it.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        self._background = [asyncio.ensure_future(self.reporter.run())]
        if args.admission.preempt_window_s is not None:
            self._background.append(asyncio.ensure_future(self._answer_preemptions()))
        self._server = None
        self._closing = False  # past the drain timeout: what is still running is cut, not retried
        if args.http.port:
            sock = http_server.bind(args.http.host, args.http.port)
            self._server = await http_server.start(self, sock)

    # ---- HTTP ----------------------------------------------------------------------------------

    async def __call__(self, scope_or_request: Any, receive: Any = None, send: Any = None) -> Any:
        """ASGI app for the Router's own server, and Ray Serve's ingress callable behind a Ray proxy."""
        if receive is None:
            return await self._respond(scope_or_request)
        if scope_or_request["type"] != "http":
            return
        response = await self._respond(Request(scope_or_request, receive))
        await response(scope_or_request, receive, send)

    async def _respond(self, request: Request) -> Response:
        path = request.url.path.rstrip("/") or "/"
        handler = self._routes.get((request.method, path))
        try:
            if handler is None:
                known = any(p == path for _, p in self._routes)
                raise GatewayError(405 if known else 404, f"no route for {request.method} {request.url.path}")
            if self.keys and path not in self._open_paths:
                request.state.key = self._authorize(request, path)
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except Exception:
            logger.exception("unexpected error answering %s %s", request.method, path)
            return GatewayError(500, "internal error in the gateway; see the router's log").response()

    def _authorize(self, request: Request, path: str) -> KeyPolicy:
        """401 without a known key, 403 for a non-admin key on the admin paths. The key is never logged."""
        policy = self.keys.lookup(bearer(request.headers.get("authorization")))
        if policy is None:
            raise GatewayError(
                401, "a valid API key is required: send it as 'Authorization: Bearer <key>'", kind="unauthorized"
            )
        if path in self._admin_paths and not policy.admin:
            raise GatewayError(403, f"{path} needs an admin API key", kind="forbidden")
        return policy

    async def _http_generate(self, request: Request, endpoint: str) -> Response:
        arrived = time.monotonic()
        body = await _json_body(request, self.args.http.max_body_bytes)
        if endpoint == "chat":
            _roles_or_400(body)
        priority = _priority_or_400(request.headers.get(PRIORITY_HEADER), body)
        key: KeyPolicy | None = getattr(request.state, "key", None)
        if key is not None:  # a class above the key's highest is capped, and X-Priority says which it got
            priority = key.cap(priority)
        flight = InFlight(priority, endpoint, arrived, self._on_finish, _tenant(key, body))
        try:
            upstream = await http_server.unless_disconnected(request.receive, self._dispatch(flight, body))
        except http_server.ClientGone:
            flight.finish("cancelled", "client_gone_while_queued" if not flight.admitted else "client_gone")
            return Response(status_code=499)
        headers = {"X-Priority": priority.label, "X-Queue-Wait-Ms": f"{(flight.queue_wait_s or 0) * 1000:.1f}"}
        if upstream.content_type != "text/event-stream":
            return await self._whole_answer(flight, upstream, headers)

        async def settle() -> None:
            flight.finish("cancelled", "client_gone")  # a no-op when the relay already finished it

        return http_server.SettledStreamingResponse(self._relay(flight, upstream), settle, headers=headers)

    async def _whole_answer(
        self, flight: InFlight, upstream: aiohttp.ClientResponse, headers: dict[str, str]
    ) -> Response:
        try:
            payload = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._closing:
                flight.finish("error", "shutdown")
                raise _shut_down() from exc
            flight.finish("error", "engine_error")
            raise GatewayError(502, f"the model replica failed while answering: {type(exc).__name__}") from exc
        if upstream.status >= 400:
            flight.finish("error", _error_kind(upstream.status, payload))
        else:
            found = COMPLETION_TOKENS.search(payload)
            flight.output_tokens = int(found.group(1)) if found else None
            flight.finish("completed")
        return Response(payload, status_code=upstream.status, headers=headers, media_type="application/json")

    async def _http_models(self, request: Request) -> Response:
        return JSONResponse(await self.models())

    async def _http_health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", **await self._ready_state()})

    async def _http_prometheus(self, request: Request) -> Response:
        await self.reporter.flush()
        text = await self.metrics.prometheus.remote(await self.admission.call("state"))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _http_stats(self, request: Request) -> Response:
        return JSONResponse(await self.stats())

    # ---- Python handle API ---------------------------------------------------------------------

    async def chat(self, body: dict[str, Any], priority: str | None = None) -> Any:
        """Non-streaming: returns the response dict. With `"stream": True` (and handle.options(stream=True)):
        yields each chunk as a dict. Errors raise GatewayError with the HTTP status it would have had."""
        return await self._handle_call("chat", body, priority)

    async def completions(self, body: dict[str, Any], priority: str | None = None) -> Any:
        return await self._handle_call("completions", body, priority)

    async def models(self) -> dict[str, Any]:
        if self._models is None:
            await self._ready_state()
            self._models = await self.llm.models.remote()
        return self._models

    async def _ready_state(self) -> dict[str, Any]:
        """Admission's picture of the gateway; 503 while no replica can serve."""
        state = await self.admission.call("state")
        if state["capacity"] == 0:
            raise GatewayError(503, "no model replica is ready to serve", retry_after_s=NOT_READY_RETRY_S)
        return state

    async def stats(self) -> dict[str, Any]:
        await self.reporter.flush()
        return await self.metrics.summary.remote(await self.admission.call("state"))

    async def _handle_call(self, endpoint: str, body: dict[str, Any], priority: str | None) -> Any:
        arrived = time.monotonic()
        if not isinstance(body, dict):
            raise GatewayError(400, "the request body must be a JSON object")
        if endpoint == "chat":
            _roles_or_400(body)
        flight = InFlight(_priority_or_400(priority, body), endpoint, arrived, self._on_finish, _tenant(None, body))
        try:
            upstream = await self._dispatch(flight, body)
        except asyncio.CancelledError:
            flight.finish("cancelled", "client_gone_while_queued" if not flight.admitted else "client_gone")
            raise
        if upstream.content_type == "text/event-stream":
            return self._handle_stream(flight, upstream)
        response = await self._whole_answer(flight, upstream, {})
        payload = json.loads(response.body)
        if response.status_code >= 400:
            raise GatewayError.from_body(response.status_code, payload)
        return payload

    async def _handle_stream(
        self, flight: InFlight, upstream: aiohttp.ClientResponse
    ) -> AsyncGenerator[dict[str, Any], None]:
        pending = b""
        try:
            async for data in self._relay(flight, upstream):
                pending += data
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    if event.startswith(b"data: ") and event != b"data: [DONE]":
                        yield json.loads(event[6:])
        finally:
            flight.finish("cancelled", "client_gone")

    # ---- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self, flight: InFlight, body: dict[str, Any], front: bool = False) -> aiohttp.ClientResponse:
        """Queue for a slot, send to its replica, and return the replica's response once its headers are in.
        A rejection finishes the request and raises GatewayError. `front`: queue again after a preemption."""
        try:
            grant = await self.admission.call(
                "acquire", flight.request_id, int(flight.priority), self.router_id, front, flight.tenant
            )
        except GatewayError as exc:
            flight.finish("rejected" if exc.status in (429, 503) else "error", exc.kind)
            raise GatewayError(exc.status, exc.message, retry_after_s=exc.retry_after_s, kind=exc.kind) from None
        except BaseException as exc:
            self._release(flight)  # the grant may be on its way: Admission drops it when it lands
            if isinstance(exc, asyncio.CancelledError):
                flight.finish("cancelled", "client_gone_while_queued")
            else:
                flight.finish("error", "admission_failed")
            raise
        flight.admitted = True
        flight.granted_at = time.monotonic()
        self._flights[flight.request_id] = flight
        flight.queue_wait_s = (flight.queue_wait_s or 0.0) + grant["queue_wait_s"]
        flight.body = body
        flight.replica_url = grant["url"]
        url = grant["url"] + ENDPOINT_PATHS[flight.endpoint]
        sent = engine_body(body, flight.priority)
        if sent.get("stream"):  # the Router counts tokens from the final usage chunk, and drops it if unasked
            options = sent.get("stream_options") or {}
            flight.client_wants_usage = bool(options.get("include_usage"))
            sent["stream_options"] = {**options, "include_usage": True}
        try:  # UTF-8, as the engine reads it; a lone surrogate (valid JSON escape, invalid text) fails here
            payload = json.dumps(sent, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            flight.finish("error", "bad_request")
            raise GatewayError(400, "the request contains text that is not valid Unicode (a lone surrogate)") from None
        try:
            flight.upstream = await self.session.post(url, data=payload, headers={"content-type": "application/json"})
        except (aiohttp.ClientError, OSError) as exc:
            await self._report_failure(grant["url"])  # before the retry, so that it goes elsewhere
            if not flight.retried:  # nothing was sent to the client: once more, on another replica
                logger.warning("LLM replica at %s unreachable (%s); retrying once", grant["url"], type(exc).__name__)
                return await self._dispatch_again(flight, body)
            flight.finish("error", "engine_unreachable")
            raise GatewayError(
                503,
                f"the model replica could not be reached: {type(exc).__name__}",
                retry_after_s=1,
                kind="engine_unreachable",
            ) from exc
        except BaseException:
            flight.finish("cancelled", "client_gone")
            raise
        if flight.upstream.status >= 500 and not flight.retried:  # the engine failed; nothing was sent yet
            logger.warning("LLM replica at %s answered %d; retrying once", grant["url"], flight.upstream.status)
            flight.upstream.close()
            await self._report_failure(grant["url"])  # a dead engine takes no more
            return await self._dispatch_again(flight, body)
        return flight.upstream

    async def _dispatch_again(self, flight: InFlight, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """The one retry of a request that failed before its first byte: a new slot, at the head of its class."""
        flight.retried = True
        self._give_up_slot(flight)
        return await self._dispatch(flight, body, front=True)

    async def _relay(self, flight: InFlight, upstream: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        """Bytes through: each read takes all that has arrived, so a backed-up stream sends fewer, larger writes.
        A preempted request (no byte sent yet) queues again at the head of its class and starts over."""
        flight.relaying = True
        while True:
            try:
                async for data in upstream.content.iter_any():
                    if USAGE in data:
                        data = self._take_usage(flight, data)
                    if ERROR_EVENT in data:
                        kind = _engine_error_kind(data)
                        if kind == "engine_error":
                            if flight.first_chunk_at is None and not flight.retried:
                                failure = "an error event before the first byte"  # the client saw nothing: retry
                                break
                            self._report_in_background(flight.replica_url)
                        flight.error_kind = kind
                    if flight.first_chunk_at is None:
                        flight.first_chunk_at = time.monotonic()
                    if data.endswith(DONE):
                        yield data
                        # The answer is whole (or its error told) even if the client hangs up now.
                        if flight.error_kind is None:
                            flight.finish("completed")
                        else:
                            flight.finish("error", flight.error_kind)
                        return
                    if data:
                        yield data
                else:
                    failure = "the stream ended before [DONE]"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = type(exc).__name__
            if self._closing:  # cut by the Router's own shutdown, past its drain timeout
                break
            if flight.preempted:
                flight.preempted = False
                flight.preemptions += 1
            elif flight.first_chunk_at is None and not flight.retried:  # failed before a byte went out
                logger.warning("LLM replica failed before the first byte (%s); retrying once", failure)
                flight.retried = True
                await self._report_failure(flight.replica_url)  # so that the retry goes elsewhere
            else:
                self._report_in_background(flight.replica_url)
                break
            try:
                upstream = await self._start_again(flight)
            except GatewayError as exc:  # the finish is counted; the client learns why in the stream
                yield f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n".encode()
                return
        if self._closing:
            error = _shut_down()
        else:
            logger.warning("LLM replica failed mid-stream: %s", failure)
            error = GatewayError(502, f"the model replica failed mid-stream: {failure}", kind="engine_error")
        flight.finish("error", error.kind)
        yield f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()

    def _report_in_background(self, url: str | None) -> None:
        """Told at once, not at the next periodic check: a dead engine must take no more requests."""
        report = asyncio.ensure_future(self._report_failure(url))
        self._reports.add(report)  # held until done: the loop keeps only weak references
        report.add_done_callback(self._reports.discard)

    async def _report_failure(self, url: str | None) -> None:
        if url is None:
            return
        try:
            await self.admission.call("report_failure", url)
        except Exception:  # Admission restarting: its replicas re-register, and the request goes on regardless
            logger.exception("reporting the failure of %s failed", url)

    def _give_up_slot(self, flight: InFlight) -> None:
        """Releases the request's slot and gives it a new id, to queue again at the head of its class."""
        self._flights.pop(flight.request_id, None)
        self.admission.release(flight.request_id)
        flight.request_id = uuid.uuid4().hex
        if flight.upstream is not None:
            flight.upstream.close()  # a no-op when it already broke
        flight.upstream = None

    async def _start_again(self, flight: InFlight) -> aiohttp.ClientResponse:
        """After a preemption or a failure before the first byte: give back the slot, queue again, resend."""
        self._give_up_slot(flight)
        upstream = await self._dispatch(flight, flight.body, front=True)
        if upstream.content_type != "text/event-stream":  # an error answer from the engine, whole
            payload = await upstream.read()
            flight.finish("error", _error_kind(upstream.status, payload))
            raise GatewayError.from_body(upstream.status, _json_or_text(payload))
        return upstream

    async def _answer_preemptions(self) -> None:
        """Admission's asks to give up a slot for a waiting high request. Only a stream that has not sent
        its first byte gives it up; any other ask is ignored, and Admission stops counting on it."""
        while True:
            try:
                asked = await self.admission.call("preemptions", self.router_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("waiting for preemption asks failed; retrying")
                await asyncio.sleep(1)
                continue
            for request_id in asked:
                flight = self._flights.get(request_id)
                if flight is None or flight.finished or not flight.relaying or flight.first_chunk_at is not None:
                    continue
                if flight.upstream is not None:
                    flight.preempted = True
                    flight.upstream.close()  # vLLM's server sees the hang-up and aborts the request

    @staticmethod
    def _take_usage(flight: InFlight, data: bytes) -> bytes:
        """Reads the completion tokens from vLLM's usage event and removes the event unless the client
        asked for it. vLLM writes each event in one write, so a read never splits one on a local link;
        if it ever did, the client would merely see the usage it did not ask for."""
        at = data.find(USAGE)
        start = data.rfind(b"data: ", 0, at)
        end = data.find(b"\n\n", at)
        if start < 0 or end < 0:
            return data
        found = COMPLETION_TOKENS.search(data, at, end)
        if found:
            flight.output_tokens = int(found.group(1))
        return data if flight.client_wants_usage else data[:start] + data[end + 2 :]

    def _release(self, flight: InFlight) -> None:
        self.admission.release(flight.request_id)

    def _on_finish(self, flight: InFlight, record: RequestRecord) -> None:
        if flight.admitted:
            self._flights.pop(flight.request_id, None)
            per_token_s = flight.per_token_s if record.outcome == "completed" else None
            self.admission.release(flight.request_id, per_token_s, flight.output_tokens)
        self.reporter.add(record)

    async def _send_records(self, records: list[dict[str, Any]]) -> None:
        await self.metrics.record.remote(records)

    async def __del__(self) -> None:
        """On shutdown or downscale: stop accepting connections, let the requests already here finish (for up
        to `drain_timeout_s`; queued ones get their slot or a 503 once the replicas drain), then close."""
        if self._server is not None:
            await http_server.drain(self._server, self.args.drain_timeout_s)
        self._closing = True
        for flight in list(self._flights.values()):  # past the timeout: end each with an error, counted
            if flight.upstream is not None:
                flight.upstream.close()
        deadline = time.monotonic() + 5
        while self._flights and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._background:
            task.cancel()
        await self.reporter.flush()  # the last requests' records
        await self.session.close()


def _json_or_text(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"error": {"message": payload.decode(errors="replace")[:500]}}


def _error_kind(status: int, payload: bytes) -> str:
    try:
        return GatewayError.from_body(status, json.loads(payload)).kind
    except ValueError:
        return "engine_error"


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """Reads at most `limit` bytes: a declared larger body is refused before reading, a body that turns out
    larger while streaming in is refused as soon as it passes the limit."""
    too_large = GatewayError(413, f"the request body is larger than the limit of {limit} bytes", kind="too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise GatewayError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def _shut_down() -> GatewayError:
    """For an answer still running when the Router stops past its drain timeout."""
    return GatewayError(503, "the gateway shut down before the answer was complete", kind="shutdown")


def _engine_error_kind(data: bytes) -> str:
    """The kind of the error event vLLM's server wrote into a stream: `engine_error` for a 5xx (the engine
    died, say), which makes the Router have the replica checked at once; else what the event says."""
    start = data.find(ERROR_EVENT) + len(b"data: ")
    end = data.find(b"\n\n", start)
    event = data[start : end if end >= 0 else len(data)]
    try:
        status = int(json.loads(event)["error"].get("code") or 500)
    except (ValueError, KeyError, TypeError, AttributeError):
        status = 500
    return "engine_error" if status >= 500 else _error_kind(status, event)


def _tenant(key: KeyPolicy | None, body: dict[str, Any]) -> str | None:
    """Whose request, for fair shares within a class and a key's rate limits: the API key's name when
    keys are on (a client cannot claim another's), else OpenAI's `user` field when given."""
    if key is not None:
        return key.name
    user = body.get("user")
    return f"user:{user}"[:200] if isinstance(user, str) and user else None


def _roles_or_400(body: dict[str, Any]) -> None:
    try:
        check_chat_roles(body)
    except InvalidBody as exc:
        raise GatewayError(400, str(exc), param=exc.param) from None


def _priority_or_400(header: str | None, body: dict[str, Any]) -> Priority:
    try:
        return request_priority(header, body)
    except InvalidPriority as exc:
        raise GatewayError(400, str(exc), param="priority") from None


RouterDeployment = serve.deployment(
    Router,
    name="Router",
    ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    max_ongoing_requests=100_000,
    logging_config=NO_ACCESS_LOG,
)
