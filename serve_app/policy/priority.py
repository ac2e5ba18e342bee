"""Request priority classes and how a request names one."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

PRIORITY_HEADER = "x-priority"
PRIORITY_FIELD = "priority"


class Priority(IntEnum):
    """Lower value is served first; the value is also vLLM's engine priority."""

    HIGH = 0
    MEDIUM = 1
    LOW = 2
    BATCH = 3  # lines of a Batch API job: only the gateway itself sends them; they never age into low

    @property
    def label(self) -> str:
        return self.name.lower()


DEFAULT_PRIORITY = Priority.MEDIUM
INTERACTIVE = (Priority.HIGH, Priority.MEDIUM, Priority.LOW)  # the classes a request may ask for


class InvalidPriority(ValueError):
    pass


def parse_priority(value: Any) -> Priority:
    """Accept only the three documented names, so a typo fails loudly instead of silently becoming medium."""
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, str):
        asked = Priority.__members__.get(value.strip().upper())
        if asked in INTERACTIVE:
            return asked
    raise InvalidPriority(f"invalid priority {value!r}: use one of 'high', 'medium' or 'low'")


def request_priority(header_value: str | None, body: dict[str, Any]) -> Priority:
    """The X-Priority header wins over the body field when both are given."""
    if header_value is not None:
        return parse_priority(header_value)
    return parse_priority(body.get(PRIORITY_FIELD))
