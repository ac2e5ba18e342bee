"""What the router checks and changes in a request body before the engine sees it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from starlette.requests import Request

from serve_app.errors import ErrorKind, GatewayError
from serve_app.policy import prefix_index
from serve_app.policy.api_keys import KeyPolicy
from serve_app.policy.priority import PRIORITY_FIELD, InvalidPriority, Priority, request_priority

# The roles OpenAI's chat API accepts; vLLM lets any string through, OpenAI answers 400.
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class InvalidBody(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_chat_roles(body: dict[str, Any]) -> None:
    """Only the role of each message is looked at; everything else is the engine's to validate."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return  # missing or malformed: vLLM's own validation answers it
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role is not None and (not isinstance(role, str) or role not in CHAT_ROLES):
            raise InvalidBody(
                f"messages[{i}].role {role!r} is not one of {', '.join(sorted(CHAT_ROLES))}", f"messages[{i}].role"
            )


def checked_class(endpoint: str, body: dict[str, Any], header: str | None, key: KeyPolicy | None) -> Priority:
    """The class a request runs at, after the checks the gateway makes itself (400s that name the field): a
    chat message's role, `chat_template_kwargs` (the gateway adds to it), and the class it asks for (the X-Priority header, else the body's `priority`). A
    class above the API key's highest is capped to it."""
    if endpoint == "chat":
        try:
            check_chat_roles(body)
        except InvalidBody as exc:
            raise GatewayError(400, str(exc), param=exc.param) from None
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise GatewayError(400, "chat_template_kwargs must be an object", param="chat_template_kwargs")
    try:
        wanted = request_priority(header, body)
    except InvalidPriority as exc:
        raise GatewayError(400, str(exc), param="priority") from None
    return key.cap(wanted) if key else wanted


# Fields LangChain users send through `extra_body` to switch Qwen3's thinking on or off.
THINKING_FIELDS = ("enable_thinking", "return_reasoning")


def engine_body(body: dict[str, Any], priority: Priority) -> dict[str, Any]:
    """A copy with our string priority replaced by vLLM's integer one and thinking flags moved into
    `chat_template_kwargs`, where the chat template reads them. An explicit chat_template_kwargs wins."""
    out = dict(body)
    out[PRIORITY_FIELD] = int(priority)
    thinking = {key: out.pop(key) for key in THINKING_FIELDS if key in out}
    if thinking:
        value = thinking.get("enable_thinking", thinking.get("return_reasoning"))
        kwargs = dict(out.get("chat_template_kwargs") or {})
        kwargs.setdefault("enable_thinking", bool(value))
        out["chat_template_kwargs"] = kwargs
    return out


# An image's tokens, as characters of text would count (about 1,000 tokens): its data URL's length says nothing.
IMAGE_CHARS = 4096


def prompt_shape(endpoint: str, body: dict[str, Any]) -> tuple[int, tuple[int, ...], int | None]:
    """What Admission places a request by (`token_load.PromptShape`'s fields): the prompt's size in characters,
    the hashes of its leading blocks (`prefix_index.block_hashes`), and `max_tokens`. Never raises: a body the
    engine will refuse is still placed somewhere, to be refused there."""
    parts: list[str] = []
    extra_chars = 0
    if endpoint == "chat":
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if not isinstance(message, dict):
                continue
            parts.append(f"<{message.get('role')}>")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if not isinstance(part, dict):
                        continue
                    if isinstance(part.get("text"), str):
                        parts.append(part["text"])
                    elif isinstance(part.get("image_url"), dict):
                        url = str(part["image_url"].get("url")).encode("utf-8", "surrogatepass")
                        parts.append(f"<image {hashlib.blake2b(url, digest_size=16).hexdigest()}>")
                        extra_chars += IMAGE_CHARS
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            parts.append(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            parts.append(" ".join(map(str, prompt)))  # token ids: about 4 characters each, as text counts
    text = "".join(parts)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    model = body.get("model")
    return (
        len(text) + extra_chars,
        prefix_index.block_hashes(text, model if isinstance(model, str) else ""),
        max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
    )


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """Reads at most `limit` bytes: a declared larger body is refused before reading, a body that turns out
    larger while streaming in is refused as soon as it passes the limit."""
    too_large = GatewayError(
        413, f"the request body is larger than the limit of {limit} bytes", kind=ErrorKind.TOO_LARGE
    )
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
