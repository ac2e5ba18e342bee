"""API keys alone: lookup, class caps, rate buckets (pure, milliseconds)."""

from __future__ import annotations

import pytest

from serve_app.config import AppArgs, AuthConfig
from serve_app.policy.api_keys import KeyPolicy, KeyRing, RateLimits, TokenBucket, bearer
from serve_app.policy.priority import Priority


def test_only_known_keys_are_found_and_the_ring_keeps_no_key_in_clear():
    ring = KeyRing({"sk-alpha": KeyPolicy("alpha"), "sk-beta": KeyPolicy("beta", admin=True)})
    assert ring.lookup("sk-alpha").name == "alpha"
    assert ring.lookup("sk-beta").admin
    for wrong in ("sk-alph", "sk-alphaa", "", None, "SK-ALPHA"):
        assert ring.lookup(wrong) is None
    assert "sk-alpha" not in repr(vars(ring)), "only digests are kept"
    assert not KeyRing({})


def test_bearer_header_parsing():
    assert bearer("Bearer sk-1") == "sk-1"
    assert bearer("bearer  sk-1 ") == "sk-1"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None


def test_a_key_caps_the_class_it_may_ask_for():
    medium = KeyPolicy("m", max_priority=Priority.MEDIUM)
    assert medium.cap(Priority.HIGH) is Priority.MEDIUM
    assert medium.cap(Priority.MEDIUM) is Priority.MEDIUM
    assert medium.cap(Priority.LOW) is Priority.LOW
    assert KeyPolicy("h").cap(Priority.HIGH) is Priority.HIGH


def test_token_bucket_refills_at_its_rate_up_to_its_burst():
    bucket = TokenBucket(rate=2.0, burst=2.0)
    assert bucket.wait_s(0.0, 1) == 0
    bucket.pay(0.0, 2)
    assert bucket.wait_s(0.0, 1) == pytest.approx(0.5)
    assert bucket.wait_s(0.5, 1) == 0
    assert bucket.wait_s(100.0, 3) == pytest.approx(0.5), "never more than the burst saved"


def test_request_rate_and_output_token_limits():
    limits = RateLimits({"a": (2.0, None), "b": (None, 600.0), "free": (None, None)})
    assert [limits.admit("a", 0.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert limits.admit("a", 0.0) == pytest.approx(0.5), "a third request in the same instant waits"
    assert limits.admit("b", 0.0) == 0.0
    limits.charge_tokens("b", 900, 0.0)  # 600 per minute = 10 per second; 300 over
    assert limits.admit("b", 0.0) == pytest.approx(30.0)
    assert limits.admit("b", 30.0) == 0.0
    assert all(limits.admit("free", 0.0) == 0.0 for _ in range(100))


def test_keys_come_from_the_config_and_from_a_key_file(tmp_path):
    key_file = tmp_path / "keys.yaml"
    key_file.write_text("sk-file:\n  name: batch\n  max_priority: low\n  requests_per_s: 5\n")
    auth = AuthConfig(keys={"sk-inline": {"name": "ops", "admin": True}}, key_file=str(key_file))
    keys = auth.resolved()
    assert keys["sk-file"].max_priority == "low" and keys["sk-inline"].admin
    assert auth.rate_limits() == {"ops": (None, None), "batch": (5.0, None)}
    with pytest.raises(ValueError):
        AppArgs.model_validate({"auth": {"keys": {"k": {"name": "x", "max_priority": "urgent"}}}})
