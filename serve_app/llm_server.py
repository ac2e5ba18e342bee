"""One vLLM v1 engine (`AsyncLLM`) in a Ray Serve replica, answering through vLLM's own OpenAI layer.

Every call is a stream to the router: the first item is a `Head` (status, and the JSON body when
the answer is not a stream), then, for streams, the SSE strings exactly as vLLM writes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from ray import serve
from starlette.datastructures import State

from serve_app.config import LLMConfig
from serve_app.engine_args import parse_serve_args
from serve_app.model_files import resolve_model_source

logger = logging.getLogger("ray.serve")


SSE_DONE = "data: [DONE]"


@dataclass
class Head:
    status: int
    body: dict[str, Any] | None = None  # set for JSON answers; None means SSE strings follow


@dataclass
class Trailer:
    """Sent just before `data: [DONE]`: the token count the router records even when the client asked for no usage."""

    completion_tokens: int | None = None


class LLMServer:
    async def __init__(self, config: LLMConfig) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        started = time.monotonic()
        model_path = resolve_model_source(config.model_source)
        args = parse_serve_args(model_path, config.model_id, config.engine_options())
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        self.engine = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=engine_args.disable_log_stats,
        )
        self.state = State()
        await init_app_state(self.engine, self.state, args, await self.engine.get_supported_tasks())
        self.model_id = config.model_id
        logger.info("LLMServer for %s ready in %.1fs", config.model_id, time.monotonic() - started)

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def num_unfinished(self) -> int:
        """Requests the engine still holds; the tests use it to see that aborts reach the engine."""
        return self.engine.get_num_unfinished_requests()

    async def models(self) -> dict[str, Any]:
        listing = await self.state.openai_serving_models.show_available_models()
        return listing.model_dump()

    async def generate(self, endpoint: str, body: dict[str, Any]) -> AsyncGenerator[Head | str | Trailer, None]:
        """`endpoint` is "chat" or "completions"; `body` is the OpenAI request with an int engine priority."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        try:
            if endpoint == "chat":
                request = ChatCompletionRequest.model_validate(body)
                result = await self.state.openai_serving_chat.create_chat_completion(request)
            else:
                request = CompletionRequest.model_validate(body)
                result = await self.state.openai_serving_completion.create_completion(request)
        except Exception as exc:  # vLLM raises for many client errors; its helper maps them to a status
            error = create_error_response(exc)
            yield Head(error.error.code, error.model_dump())
            return
        if hasattr(result, "error"):
            yield Head(result.error.code, result.model_dump())
            return
        if not hasattr(result, "__aiter__"):
            yield Head(200, result.model_dump())
            return
        yield Head(200)
        trailer = Trailer()
        async for chunk in result:
            if '"usage":{' in chunk and '"choices":[]' in chunk:
                trailer.completion_tokens = _completion_tokens(chunk)
                if not client_wants_usage:
                    continue
            if chunk.startswith(SSE_DONE):
                # Before [DONE]: a client may hang up as soon as it sees it.
                yield trailer
            yield chunk


def _completion_tokens(sse_chunk: str) -> int | None:
    try:
        return json.loads(sse_chunk.removeprefix("data: "))["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None


LLMDeployment = serve.deployment(LLMServer, name="LLMServer")
