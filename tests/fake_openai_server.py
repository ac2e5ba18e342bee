"""A test fixture, not the product: an OpenAI-style streaming server with known, injected token timing.

Each stream sends its first text chunk after TTFT_S, then one chunk per ITL_S, `max_tokens` in all,
then a usage chunk. Prompts containing FAIL429 / FAIL500 answer with that status.
Run: python tests/fake_openai_server.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

TTFT_S = 0.100
ITL_S = 0.020
MODEL = "fake-model"


async def models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def generate(request: Request):
    body = await request.json()
    prompt = body.get("prompt") or body["messages"][-1]["content"]
    for status in (429, 500):
        if f"FAIL{status}" in prompt:
            return JSONResponse({"error": {"message": f"injected {status}", "code": status}}, status_code=status)
    tokens = int(body.get("max_tokens") or 8)
    chat = "messages" in body

    def chunk(i: int) -> str:
        choice = {"index": 0, "delta": {"content": f"t{i} "}} if chat else {"index": 0, "text": f"t{i} "}
        return f"data: {json.dumps({'choices': [choice]})}\n\n"

    async def stream():
        await asyncio.sleep(TTFT_S)
        yield chunk(0)
        for i in range(1, tokens):
            await asyncio.sleep(ITL_S)
            yield chunk(i)
        usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


app = Starlette(
    routes=[
        Route("/v1/models", models),
        Route("/v1/chat/completions", generate, methods=["POST"]),
        Route("/v1/completions", generate, methods=["POST"]),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
