"""One vLLM v1 engine (`AsyncLLM`) in a Ray Serve replica, answering the Router over plain HTTP.

The replica runs vLLM's own OpenAI serving layer behind a small HTTP server of its own, and
registers that address with the Admission deployment, which hands its slots to the Routers. The
bytes a client receives are the SSE strings vLLM writes, untouched, with one addition: a comment
line `: completion_tokens N` just before `data: [DONE]`, which the Router reads for its metrics
and removes. Answers that are not streams carry the count in the `X-Completion-Tokens` header.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serve_app import http_server, vllm_compat
from serve_app.config import LLMConfig
from serve_app.engine_args import parse_serve_args
from serve_app.model_files import resolve_model_source

logger = logging.getLogger("ray.serve")

SSE_DONE = "data: [DONE]\n\n"
TOKENS_TRAILER = ": completion_tokens "
TOKENS_HEADER = "x-completion-tokens"
# The paths the Router posts to: the OpenAI ones, with the body already rewritten for the engine.
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class LLMServer:
    async def __init__(self, config: LLMConfig, admission: DeploymentHandle) -> None:
        vllm_compat.check_version()
        started = time.monotonic()
        model_path = resolve_model_source(config.model_source)
        args = parse_serve_args(model_path, config.model_id, config.engine_options())
        self.engine = vllm_compat.build_engine(args)
        self.state = State()
        await vllm_compat.init_app_state()(self.engine, self.state, args, await self.engine.get_supported_tasks())
        self._chat_request, self._completion_request = vllm_compat.request_models()
        self._create_error_response = vllm_compat.create_error_response()
        self.model_id = config.model_id
        self.in_flight = 0

        app = Starlette(
            routes=[
                Route(ENDPOINT_PATHS["chat"], self._http_chat, methods=["POST"]),
                Route(ENDPOINT_PATHS["completions"], self._http_completions, methods=["POST"]),
                Route("/health", self._http_health, methods=["GET"]),
            ]
        )
        host = ray.util.get_node_ip_address()
        self._server = await http_server.start(app, http_server.bind(host, 0, share=False))
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.admission = admission
        self.max_ongoing = config.autoscaling.max_ongoing_requests
        await admission.register_replica.remote(self.replica_id, self.url, self.max_ongoing)
        logger.info("LLMServer for %s ready at %s in %.1fs", config.model_id, self.url, time.monotonic() - started)

    # ---- Ray Serve hooks -----------------------------------------------------------------------

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What `serve_app.autoscaling` scales on: requests running here, and the gateway's queue."""
        queued = await self.admission.queued_total.remote()
        return {"ongoing": float(self.in_flight), "queued": float(queued)}

    async def __del__(self) -> None:
        """On downscale or shutdown: leave the Admission pool first, so no new request is sent here."""
        try:
            await self.admission.deregister_replica.remote(self.replica_id)
        except Exception:
            pass

    # ---- control calls (Ray handle) -------------------------------------------------------------

    async def num_unfinished(self) -> int:
        """Requests the engine still holds; the tests use it to see that aborts reach the engine."""
        return vllm_compat.num_unfinished(self.engine)

    async def models(self) -> dict[str, Any]:
        listing = await self.state.openai_serving_models.show_available_models()
        return listing.model_dump()

    # ---- data path (HTTP from the Router) -------------------------------------------------------

    async def _http_health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "in_flight": self.in_flight})

    async def _http_chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _http_completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        """The body comes from the Router: valid JSON, priority already an int for the engine."""
        body = json.loads(await request.body())
        self.in_flight += 1
        try:
            result, client_wants_usage = await http_server.unless_disconnected(
                request.receive, self._start(endpoint, body)
            )
        except http_server.ClientGone:
            self.in_flight -= 1
            return Response(status_code=499)
        except BaseException:
            self.in_flight -= 1
            raise
        if isinstance(result, Response):
            self.in_flight -= 1
            return result

        async def settle() -> None:
            self.in_flight -= 1
            await result.aclose()  # an abort reaches the engine however the stream ended

        return http_server.SettledStreamingResponse(self._stream(result, client_wants_usage), settle)

    async def _start(self, endpoint: str, body: dict[str, Any]) -> tuple[Any, bool]:
        """vLLM's answer: a Response when it is whole (JSON or error), else its SSE generator."""
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            if endpoint == "chat":
                result = await self.state.openai_serving_chat.create_chat_completion(
                    self._chat_request.model_validate(body)
                )
            else:
                result = await self.state.openai_serving_completion.create_completion(
                    self._completion_request.model_validate(body)
                )
        except Exception as exc:  # vLLM raises for many client errors; its helper maps them to a status
            error = self._create_error_response(exc)
            return JSONResponse(error.model_dump(), status_code=error.error.code), False
        if hasattr(result, "error"):
            return JSONResponse(result.model_dump(), status_code=result.error.code), False
        if not hasattr(result, "__aiter__"):
            tokens = getattr(result.usage, "completion_tokens", None) if getattr(result, "usage", None) else None
            headers = {TOKENS_HEADER: str(tokens)} if tokens is not None else None
            return JSONResponse(result.model_dump(), headers=headers), False
        return result, client_wants_usage

    async def _stream(self, chunks: AsyncGenerator[str, None], client_wants_usage: bool) -> AsyncGenerator[str, None]:
        tokens: int | None = None
        async for chunk in chunks:
            if chunk.startswith(SSE_DONE):
                trailer = f"{TOKENS_TRAILER}{tokens}\n\n" if tokens is not None else ""
                yield trailer + chunk  # one write: the Router finds both in the same read
                continue
            if '"usage":{' in chunk and '"choices":[]' in chunk:  # vLLM's final usage chunk
                tokens = _completion_tokens(chunk)
                if not client_wants_usage:
                    continue
            yield chunk


def _completion_tokens(sse_chunk: str) -> int | None:
    try:
        return json.loads(sse_chunk.removeprefix("data: "))["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None


LLMDeployment = serve.deployment(LLMServer, name="LLMServer")
