"""The two client modes over one streaming request: blocking (used from a thread pool) and asyncio.

Both parse the same SSE stream into the same `RequestResult`, so the only difference measured
is the client's concurrency model.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from serve_app.bench.workload import RequestSpec

CLOCK = time.perf_counter


@dataclass
class RequestResult:
    index: int
    priority: str | None
    intended_at: float | None  # open loop: when the schedule said to send (run clock, s)
    sent_at: float = 0.0
    first_token_at: float | None = None
    end_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with generated text
    output_tokens: int | None = None
    status: int | None = None
    outcome: str = "ok"  # ok | rate_limited | timeout | error
    error: str | None = None
    retry_after: str | None = None  # the Retry-After header of an error answer
    queue_wait_ms: float | None = None  # the gateway's X-Queue-Wait-Ms header; None without it (bare vLLM)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StreamReader:
    """Feeds SSE lines; records when text arrives and the usage the server reports."""

    def __init__(self, result: RequestResult, origin: float) -> None:
        self.result = result
        self.origin = origin

    def line(self, line: str) -> bool:
        """Returns False at `data: [DONE]`."""
        if not line.startswith("data:"):
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            return False
        chunk = json.loads(data)
        if "error" in chunk:
            self.result.outcome, self.result.error = "error", f"stream_error: {chunk['error'].get('message', '')}"
            return False
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
            if text or (choice.get("delta") or {}).get("reasoning_content"):
                now = CLOCK() - self.origin
                if self.result.first_token_at is None:
                    self.result.first_token_at = now
                self.result.chunk_times.append(now)
                break
        usage = chunk.get("usage")
        if usage:
            self.result.output_tokens = usage.get("completion_tokens")
        return True


def queue_wait_ms(headers: httpx.Headers) -> float | None:
    """The gateway's time in its priority queue, from its `X-Queue-Wait-Ms` answer header."""
    value = headers.get("x-queue-wait-ms")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _finish_http_error(result: RequestResult, response_status: int, body: bytes, retry_after: str | None) -> None:
    result.status = response_status
    result.retry_after = retry_after
    result.outcome = "rate_limited" if response_status == 429 else "error"
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    result.error = f"http_{response_status}: {message}"


def _classify(result: RequestResult, exc: Exception) -> None:
    if isinstance(exc, httpx.TimeoutException):
        result.outcome, result.error = "timeout", type(exc).__name__
    else:
        result.outcome, result.error = "error", f"{type(exc).__name__}: {exc}"


def send_sync(
    client: httpx.Client,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    spec: RequestSpec,
    origin: float,
    intended_at: float | None,
) -> RequestResult:
    result = RequestResult(spec.index, spec.priority, intended_at)
    result.sent_at = CLOCK() - origin
    try:
        with client.stream("POST", path, json=body, headers=headers) as response:
            result.queue_wait_ms = queue_wait_ms(response.headers)
            if response.status_code != 200:
                _finish_http_error(result, response.status_code, response.read(), response.headers.get("retry-after"))
            else:
                result.status = 200
                reader = StreamReader(result, origin)
                for line in response.iter_lines():
                    if not reader.line(line):
                        break
    except Exception as exc:  # every failure is a counted outcome, never a crash of the run
        _classify(result, exc)
    result.end_at = CLOCK() - origin
    return result


async def send_async(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    spec: RequestSpec,
    origin: float,
    intended_at: float | None,
) -> RequestResult:
    result = RequestResult(spec.index, spec.priority, intended_at)
    result.sent_at = CLOCK() - origin
    try:
        async with client.stream("POST", path, json=body, headers=headers) as response:
            result.queue_wait_ms = queue_wait_ms(response.headers)
            if response.status_code != 200:
                _finish_http_error(
                    result, response.status_code, await response.aread(), response.headers.get("retry-after")
                )
            else:
                result.status = 200
                reader = StreamReader(result, origin)
                async for line in response.aiter_lines():
                    if not reader.line(line):
                        break
    except Exception as exc:
        _classify(result, exc)
    result.end_at = CLOCK() - origin
    return result
