"""An engine test double for benchmark harnesses, never the product: an OpenAI server that streams as vLLM's does.

It runs one "engine step" every `--step-ms` and gives each running stream one token per step, as a batching
engine does, so thousands of streams cost one timer. Events are framed like vLLM's (a role chunk, one chunk
per `--stream-interval` tokens, a finish chunk, the usage chunk when asked, `[DONE]`), and it answers the
paths the gateway uses (`/health`, `/v1/models`, `/metrics` with vLLM's request gauges). What it costs is a
fraction of a real server's: the Router's share of the CPU is what a harness measures in front of it.

    python scripts/fake_engine.py --port 8101 --step-ms 10 --stream-interval 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web


class Steps:
    """One shared future per engine step: every running stream wakes on the same tick."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.tick: asyncio.Future[None] | None = None
        self.running = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.tick = loop.create_future()
        while True:
            await asyncio.sleep(self.step_s)
            tick, self.tick = self.tick, loop.create_future()
            tick.set_result(None)

    async def wait(self, steps: int = 1) -> None:
        for _ in range(steps):
            assert self.tick is not None
            await asyncio.shield(self.tick)


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def make_app(model: str, step_s: float, prefill_s: float, stream_interval: int) -> web.Application:
    steps = Steps(step_s)

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        chat = request.path.endswith("/chat/completions")
        tokens = max(1, int(body.get("max_tokens") or 16))
        prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt") or "")) // 4
        kind = "chat.completion" if chat else "text_completion"
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model,
        }
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + tokens, "completion_tokens": tokens}
        steps.running += 1
        try:
            await asyncio.sleep(prefill_s)
            await steps.wait()
            if not body.get("stream"):
                await steps.wait(tokens - 1)
                text = "tok " * tokens
                choice = {"index": 0, "finish_reason": "length"}
                choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
                return web.json_response({**base, "object": kind, "choices": [choice], "usage": usage})
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            chunk_kind = "chat.completion.chunk" if chat else kind

            def chunk(text: str | None, finish: str | None = None, role: bool = False) -> bytes:
                if chat:
                    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                    if text is not None:
                        delta["content"] = text
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                return _event({**base, "object": chunk_kind, "choices": [choice]})

            if chat:
                await response.write(chunk(None, role=True))
            await response.write(chunk("tok "))  # the first token at once, the rest every `stream_interval`
            sent = 1
            while sent < tokens:
                group = min(stream_interval, tokens - sent)
                await steps.wait(group)
                sent += group
                await response.write(chunk("tok " * group))
            tail = chunk(None if chat else "", finish="length")
            if (body.get("stream_options") or {}).get("include_usage"):
                tail += _event({**base, "object": chunk_kind, "choices": [], "usage": usage})
            await response.write(tail + b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            steps.running -= 1

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]})

    async def metrics(request: web.Request) -> web.Response:
        label = f'{{model_name="{model}"}}'
        return web.Response(
            text=f"vllm:num_requests_running{label} {steps.running}\nvllm:num_requests_waiting{label} 0\n"
        )

    async def start_steps(app: web.Application) -> None:
        app["steps"] = asyncio.ensure_future(steps.run())

    app = web.Application()
    app.on_startup.append(start_steps)
    app.add_routes(
        [
            web.post("/v1/chat/completions", generate),
            web.post("/v1/completions", generate),
            web.get("/health", health),
            web.get("/v1/models", models),
            web.get("/metrics", metrics),
        ]
    )
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", default="fake-model")
    p.add_argument("--step-ms", type=float, default=10.0, help="one token per running stream per step")
    p.add_argument("--prefill-ms", type=float, default=0.0, help="before the first step of each request")
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per chunk after the first, as vLLM's")
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = make_app(args.model, args.step_ms / 1000, args.prefill_ms / 1000, max(1, args.stream_interval))
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
