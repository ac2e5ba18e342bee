"""What the router changes in a request body before the engine sees it."""

from __future__ import annotations

from typing import Any

from serve_app.priority import PRIORITY_FIELD, Priority

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
