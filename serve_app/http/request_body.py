"""What the router checks and changes in a request body before the engine sees it."""

from __future__ import annotations

from typing import Any

from serve_app.errors import GatewayError
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
