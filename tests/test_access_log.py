"""The access log through the real Router (tests/router_harness.py): one JSON line per finished request, with
the tenant's name and never its API key; nothing at all while it is off."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from router_harness import CHAT, TOKENS, open_gateway, post

from serve_app.observability import access_log

pytestmark = pytest.mark.asyncio(loop_scope="session")

KEY = "sk-test-4c1d9a7e0b"
FIELDS = {
    "ts",
    "request_id",
    "trace_id",
    "class",
    "endpoint",
    "model",
    "tenant",
    "outcome",
    "error_kind",
    "queue_wait_ms",
    "ttft_ms",
    "e2e_ms",
    "output_tokens",
    "replica",
    "retried",
    "preemptions",
}


@pytest.fixture
def lines() -> Iterator[list[str]]:
    """What the `serve_app.access` logger writes, a line each; at INFO even while the log is off, so that
    the test of off would see a line that was written."""
    written: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: written.append(record.getMessage())  # type: ignore[method-assign]
    level = access_log.logger.level
    access_log.logger.addHandler(handler)
    access_log.logger.setLevel(logging.INFO)
    try:
        yield written
    finally:
        access_log.logger.removeHandler(handler)
        access_log.logger.setLevel(level)


async def test_each_finished_request_is_one_json_line_naming_its_tenant_never_its_key(lines):
    auth = {"Authorization": f"Bearer {KEY}"}
    async with open_gateway(access_log=True, auth={"keys": {KEY: {"name": "team-a"}}}) as gateway:
        assert (await post(gateway, CHAT, **auth)).status_code == 503  # no replica yet: rejected
        fake = await gateway.replica()
        assert (await post(gateway, {**CHAT, "stream": True}, **auth, **{"X-Priority": "high"})).status_code == 200
        assert (await post(gateway, CHAT, **auth)).status_code == 200
    assert all(KEY not in line for line in lines)
    rejected, streamed, whole = (json.loads(line) for line in lines)
    assert all(set(entry) == FIELDS for entry in (rejected, streamed, whole))
    assert {entry["tenant"] for entry in (rejected, streamed, whole)} == {"team-a"}
    assert (rejected["outcome"], rejected["error_kind"], rejected["replica"]) == ("rejected", "not_ready", None)
    assert (streamed["class"], streamed["outcome"], streamed["error_kind"]) == ("high", "completed", None)
    assert (streamed["model"], streamed["output_tokens"], streamed["replica"]) == ("fake", TOKENS, fake.url)
    assert streamed["ttft_ms"] > 0 and streamed["e2e_ms"] >= streamed["ttft_ms"] and streamed["queue_wait_ms"] >= 0
    assert (streamed["retried"], streamed["preemptions"], streamed["trace_id"]) == (False, 0, None)
    assert (whole["class"], whole["ttft_ms"], whole["output_tokens"]) == ("medium", None, TOKENS)
    assert len({entry["request_id"] for entry in (rejected, streamed, whole)}) == 3


async def test_nothing_is_logged_while_the_access_log_is_off(lines):
    async with open_gateway() as gateway:
        await gateway.replica()
        assert (await post(gateway, CHAT)).status_code == 200
    assert lines == []
