"""A Router's HTTP surface: the OpenAI routes, API keys and body limits. Generation is the Router's job.

Routes are matched by Starlette's routing; an unknown path is a 404 and a known path with another
method a 405 with `Allow`, both in OpenAI's error JSON, as every error here is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route

from serve_app.config import ApiKeyConfig
from serve_app.errors import ErrorKind, GatewayError, refusal_error
from serve_app.http import server
from serve_app.http.batch_routes import BatchRoutes
from serve_app.http.request_body import read_json_body
from serve_app.policy.api_keys import KeyPolicy, KeyRing, bearer
from serve_app.policy.priority import PRIORITY_HEADER, parse_priority
from serve_app.policy.refusals import NotReady
from serve_app.policy.routing import Routing

if TYPE_CHECKING:
    from serve_app.deployments.router import Router

logger = logging.getLogger("ray.serve")

Handler = Callable[[Request], Awaitable[Response]]
ADMIN_PATHS = frozenset({"/metrics", "/metrics/targets", "/v1/stats", "/v1/admin/routing"})
ROUTINGS = tuple(r.value for r in Routing)
OPEN_PATHS = frozenset({"/health"})  # load balancers and probes carry no key


class HttpApi:
    """The ASGI app each Router replica serves on the public port (and behind Ray's proxy, if it is on)."""

    def __init__(
        self, router: Router, keys: Mapping[str, ApiKeyConfig], max_body_bytes: int, batches: BatchRoutes | None = None
    ) -> None:
        """`keys`: API key -> its settings; none, and every caller is let in. `batches`: the Batch API's routes."""
        self.router = router
        self.keys = KeyRing(
            {
                key: KeyPolicy(
                    c.name, parse_priority(c.max_priority), c.requests_per_s, c.output_tokens_per_min, c.admin
                )
                for key, c in keys.items()
            }
        )
        self.max_body_bytes = max_body_bytes
        self.batch_api = batches or BatchRoutes(None, 0, max_body_bytes)
        self._model_list: dict[str, Any] | None = None
        self.routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/metrics", self._prometheus, methods=["GET"]),
            Route("/v1/stats", self._stats, methods=["GET"]),
            Route("/metrics/targets", self._targets, methods=["GET"]),
            Route("/v1/admin/routing", self._routing, methods=["GET", "PUT"]),
            *self.batch_api.routes,
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        response = await self.respond(Request(scope, receive))
        await response(scope, receive, send)

    async def respond(self, request: Request) -> Response:
        try:
            route = self._route(request)
            if self.keys and route.path not in OPEN_PATHS:
                request.state.key = self._authorize(request, route.path)
            handler: Handler = route.endpoint  # type: ignore[assignment]
            return await handler(request)
        except GatewayError as exc:
            return exc.response()
        except Exception:
            logger.exception("unexpected error answering %s %s", request.method, request.url.path)
            return GatewayError(500, "internal error in the gateway; see the router's log").response()

    def _route(self, request: Request) -> Route:
        scope = {**request.scope, "path": request.url.path.rstrip("/") or "/"}
        allowed: set[str] = set()
        for route in self.routes:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                request.scope.update(child_scope)  # its path parameters: /v1/batches/{batch_id}
                return route
            if match is Match.PARTIAL:
                allowed |= route.methods or set()
        if allowed:
            raise GatewayError(
                405,
                f"{request.method} is not allowed on {request.url.path}; use {', '.join(sorted(allowed))}",
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        raise GatewayError(404, f"no route for {request.method} {request.url.path}")

    def _authorize(self, request: Request, path: str) -> KeyPolicy:
        """401 without a known key, 403 for a non-admin key on the admin paths. The key is never logged."""
        policy = self.keys.lookup(bearer(request.headers.get("authorization")))
        if policy is None:
            raise GatewayError(
                401,
                "a valid API key is required: send it as 'Authorization: Bearer <key>'",
                kind=ErrorKind.UNAUTHORIZED,
            )
        if path in ADMIN_PATHS and not policy.admin:
            raise GatewayError(403, f"{path} needs an admin API key", kind=ErrorKind.FORBIDDEN)
        return policy

    # ---- endpoints -----------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        arrived = time.monotonic()
        body = await read_json_body(request, self.max_body_bytes)
        key: KeyPolicy | None = getattr(request.state, "key", None)
        flight = self.router.open_flight(
            endpoint, body, request.headers.get(PRIORITY_HEADER), key, arrived, request.headers
        )
        try:
            upstream = await server.unless_disconnected(request.receive, self.router.dispatch(flight, body))
        except server.ClientGone:
            flight.finish("cancelled", flight.gone_kind)
            return Response(status_code=499)
        headers = {"X-Priority": flight.priority.label, "X-Queue-Wait-Ms": f"{(flight.queue_wait_s or 0) * 1000:.1f}"}
        if upstream.content_type != "text/event-stream":
            status, payload = await self.router.whole_answer(flight, upstream)
            return Response(payload, status_code=status, headers=headers, media_type="application/json")

        async def settle() -> None:
            flight.finish("cancelled", ErrorKind.CLIENT_GONE)  # a no-op when the relay already finished it

        return server.SettledStreamingResponse(self.router.relay(flight, upstream), settle, headers=headers)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(await self.models())

    async def _health(self, request: Request) -> Response:
        """Open to probes without a key: the gateway's counts, not its engines' addresses (`/metrics/targets`)."""
        state = {k: v for k, v in (await self.ready_state()).items() if k != "replica_detail"}
        return JSONResponse({"status": "ok", **state})

    async def _prometheus(self, request: Request) -> Response:
        await self.router.reporter.flush()
        text = await self.router.metrics.prometheus.remote(await self.router.admission.state())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def _stats(self, request: Request) -> Response:
        return JSONResponse(await self.stats())

    async def _targets(self, request: Request) -> Response:
        """Prometheus's HTTP service discovery (`http_sd_configs`): every LLM replica's vLLM server, whose own
        /metrics has the engine's figures. A replica's `instance` is the `replica` label of the gateway's."""
        state = await self.router.admission.state()
        targets = [replica["replica"] for replica in state.get("replica_detail", [])]
        return JSONResponse([{"targets": targets, "labels": {}}] if targets else [])

    async def _routing(self, request: Request) -> Response:
        """How replicas are picked: GET reads it, PUT {"routing": ...} switches it live for every Router (an
        operator's A/B on live traffic, without restarting the engines)."""
        if request.method == "GET":
            return JSONResponse({"routing": (await self.router.admission.state())["routing"]})
        body = await read_json_body(request, self.max_body_bytes)
        wanted = body.get("routing")
        if wanted not in ROUTINGS:
            raise GatewayError(400, f"routing must be one of {', '.join(ROUTINGS)}; got {wanted!r}", param="routing")
        previous = await self.router.admission.set_routing(wanted)
        return JSONResponse({"routing": wanted, "previous": previous})

    # ---- the gateway's state, also for handle callers ------------------------------------------

    async def models(self) -> dict[str, Any]:
        if self._model_list is None:
            await self.ready_state()
            self._model_list = await self.router.llm.models.remote()
        return self._model_list

    async def ready_state(self) -> dict[str, Any]:
        """Admission's picture of the gateway; 503 while no replica can serve."""
        state = await self.router.admission.state()
        if state["capacity"] == 0:
            raise refusal_error(NotReady("no model replica is ready to serve"))
        return state

    async def stats(self) -> dict[str, Any]:
        await self.router.reporter.flush()  # this Router's finished requests are counted before it answers
        state = await self.router.admission.state()
        summary = await self.router.metrics.summary.remote(state)
        if self.batch_api.batches is not None:
            batch = await self.batch_api.batches.stats.remote()
            # The slots interactive requests leave, and the share of them batch lines hold.
            spare = state["capacity"] - (state["in_flight"] - batch["batch_lines_granted"])
            batch["spare_slots_used"] = round(batch["batch_lines_granted"] / spare, 3) if spare > 0 else None
            summary["batch"] = batch
        return summary
