"""API keys: who may call, at which class at most, and how fast. Pure: no Ray, no HTTP, no asyncio.

Keys are kept only as SHA-256 digests and compared with `hmac.compare_digest` against every known
digest, so neither the time of a lookup nor a dump of the Router's memory gives a key away. A key
is never logged; requests are attributed to its `name`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from serve_app.policy.priority import Priority


@dataclass(frozen=True)
class KeyPolicy:
    name: str
    max_priority: Priority = Priority.HIGH
    requests_per_s: float | None = None
    output_tokens_per_min: float | None = None
    admin: bool = False

    def cap(self, asked: Priority) -> Priority:
        """The class a request gets: what it asked for, or the key's highest class if it asked for more."""
        return Priority(max(asked, self.max_priority))


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    def __init__(self, keys: Mapping[str, KeyPolicy]) -> None:
        self._entries = [(digest(key), policy) for key, policy in keys.items()]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def lookup(self, presented: str | None) -> KeyPolicy | None:
        """Compares against every key, whatever matches first, so the time taken says nothing about which."""
        if not presented:
            return None
        wanted = digest(presented)
        found = None
        for known, policy in self._entries:
            if hmac.compare_digest(known, wanted):
                found = policy
        return found


def bearer(authorization: str | None) -> str | None:
    """The key from `Authorization: Bearer <key>`, as the OpenAI SDKs send it."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


@dataclass
class TokenBucket:
    """`rate` units per second, up to `burst` saved. The balance may go below zero when a cost is only known
    afterwards (output tokens); the next request then waits until it is paid back."""

    rate: float
    burst: float
    balance: float = field(default=math.nan)
    updated: float = 0.0

    def refill(self, now: float) -> None:
        if math.isnan(self.balance):
            self.balance, self.updated = self.burst, now
        self.balance = min(self.burst, self.balance + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, now: float, cost: float) -> float:
        """0 if `cost` can be paid now; else how long until it can."""
        self.refill(now)
        return 0.0 if self.balance >= cost else (cost - self.balance) / self.rate

    def pay(self, now: float, cost: float) -> None:
        self.refill(now)
        self.balance -= cost


class RateLimits:
    """Per key name: a request bucket (requests_per_s, bursts of one second's worth) and an output-token
    bucket (output_tokens_per_min, bursts of one minute's worth), charged when the tokens are known."""

    def __init__(self, policies: Mapping[str, tuple[float | None, float | None]]) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        for name, (per_s, tokens_per_min) in policies.items():
            if per_s:
                self._requests[name] = TokenBucket(per_s, max(per_s, 1.0))
            if tokens_per_min:
                self._tokens[name] = TokenBucket(tokens_per_min / 60, tokens_per_min)

    def admit(self, name: str, now: float) -> float:
        """0 and the request is counted, or the seconds to wait (nothing counted)."""
        requests, tokens = self._requests.get(name), self._tokens.get(name)
        wait = max(
            requests.wait_s(now, 1.0) if requests else 0.0,
            tokens.wait_s(now, 0.0) if tokens else 0.0,
        )
        if wait > 0:
            return wait
        if requests:
            requests.pay(now, 1.0)
        return 0.0

    def charge_tokens(self, name: str, tokens: int, now: float) -> None:
        bucket = self._tokens.get(name)
        if bucket is not None and tokens > 0:
            bucket.pay(now, tokens)
