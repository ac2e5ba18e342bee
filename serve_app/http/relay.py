"""What the Router reads in the bytes it relays: vLLM's server-sent events, looked at without parsing them.

The relay passes each read through as it came; these helpers find the few things the gateway needs in
it: the end of the stream, the final usage event (which carries the output token count, and which the
client may not have asked for), and an error event. No I/O here: bytes in, bytes and facts out.
"""

from __future__ import annotations

import json
import re
from typing import Any

from serve_app.errors import ErrorKind, GatewayError

DONE = b"data: [DONE]\n\n"
USAGE = b'"usage":{'  # only vLLM's final usage chunk has a usage object in a stream
ERROR_EVENT = b'data: {"error"'  # vLLM ends a stream that failed inside its server with one, then [DONE]
COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')
PROMPT_TOKENS = re.compile(rb'"prompt_tokens":\s*(\d+)')


def completion_tokens(payload: bytes, start: int = 0, end: int | None = None) -> int | None:
    found = COMPLETION_TOKENS.search(payload, start, len(payload) if end is None else end)
    return int(found.group(1)) if found else None


def prompt_tokens(payload: bytes) -> int | None:
    """The prompt tokens a usage object counts: what teaches Admission the characters per token."""
    found = PROMPT_TOKENS.search(payload)
    return int(found.group(1)) if found else None


def take_usage(data: bytes, keep: bool) -> tuple[bytes, int | None]:
    """The completion tokens of vLLM's usage event in `data`, and `data` without that event unless `keep`.
    vLLM writes each event in one write, so a read never splits one on a local link; if it ever did, the
    client would merely see the usage it did not ask for."""
    at = data.find(USAGE)
    if at < 0:
        return data, None
    start = data.rfind(b"data: ", 0, at)
    end = data.find(b"\n\n", at)
    if start < 0 or end < 0:
        return data, None
    tokens = completion_tokens(data, at, end)
    return (data if keep else data[:start] + data[end + 2 :]), tokens


def error_kind(status: int) -> ErrorKind:
    """How an engine's error answer is counted: a 5xx is the engine's failure, a 4xx the request's."""
    return ErrorKind.ENGINE_ERROR if status >= 500 else ErrorKind.for_status(status)


def engine_error_kind(data: bytes) -> ErrorKind:
    """The kind of the error event vLLM's server wrote into a stream: ENGINE_ERROR for a 5xx (the engine
    died, say), which has the replica checked at once; else the kind of the status the event names."""
    start = data.find(ERROR_EVENT) + len(b"data: ")
    end = data.find(b"\n\n", start)
    event = data[start : end if end >= 0 else len(data)]
    try:
        status = int(json.loads(event)["error"].get("code") or 500)
    except (ValueError, KeyError, TypeError, AttributeError):
        status = 500
    return error_kind(status)


def error_event(error: GatewayError) -> bytes:
    """How a stream that already started tells its client that it failed: OpenAI's error JSON, then the end."""
    return f"data: {json.dumps(error.body())}\n\n".encode() + DONE


def json_or_text(payload: bytes) -> dict[str, Any]:
    """An engine's error answer as a dict, whether or not it was JSON."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"error": {"message": payload.decode(errors="replace")[:500]}}


class EventSplitter:
    """For handle callers, who get each chunk as a dict: the JSON of each whole event, across reads."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[Any]:
        *events, self._pending = (self._pending + data).split(b"\n\n")
        return [json.loads(event[6:]) for event in events if event.startswith(b"data: ") and event != DONE[:-2]]
