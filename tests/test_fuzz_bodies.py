"""Malformed bodies on the real gateway: a generated table of bad inputs, none may get a 5xx, every
error is OpenAI's error JSON, and the gateway serves normally afterwards."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from conftest import MODEL_ID

pytestmark = pytest.mark.engine

CHAT = [{"role": "user", "content": "Hi"}]
GOOD = {
    "chat": {"model": MODEL_ID, "messages": CHAT, "max_tokens": 2},
    "completions": {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2},
}
ODD_VALUES = [None, -1, 0, 1.5, 10**30, "", "x" * 3000, "\udcff", [], {}, [None], {"a": {"b": []}}, True, "NaN"]
RAW_BODIES = [
    b"",
    b"{",
    b"null",
    b"[]",
    b'"a string"',
    b"42",
    b"\xff\xfe\x00garbage",
    b'{"model": "' + MODEL_ID.encode() + b'", "messages": [' + b"[" * 2000 + b"]" * 2000 + b"]}",
    b'{"messages": ' + json.dumps(CHAT).encode() + b", " * 3 + b"}",
]


def bodies() -> list[tuple[str, bytes]]:
    """Every field of a good body set to every odd value, whole bodies of the wrong shape, and raw bytes."""
    rng = random.Random(7)
    cases: list[tuple[str, bytes]] = []
    for endpoint, good in GOOD.items():
        fields = [*good, "stream", "n", "temperature", "top_p", "stop", "stream_options", "priority", "logprobs"]
        for field in fields:
            for value in ODD_VALUES:
                if field == "max_tokens" and value is None:
                    continue  # valid, not malformed: it asks for the whole context, minutes on a busy CPU
                body = {**good, field: value}
                cases.append((endpoint, json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")))
        for _ in range(20):  # random subsets of fields with random odd values
            body = {k: rng.choice([v, rng.choice(ODD_VALUES)]) for k, v in good.items() if rng.random() < 0.8}
            body["max_tokens"] = rng.choice([2, rng.choice(ODD_VALUES) or 2])  # never unbounded: see above
            cases.append((endpoint, json.dumps(body).encode("utf-8", "surrogatepass")))
        cases += [(endpoint, raw) for raw in RAW_BODIES]
    chat_messages = [
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": [{"type": "nonsense"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        [{"role": "assistant", "content": None}],
        ["hi"],
        [{"role": ["user"], "content": "hi"}],
        [{"role": "tool", "content": "hi"}],
    ]
    for messages in chat_messages:
        cases.append(("chat", json.dumps({**GOOD["chat"], "messages": messages}).encode()))
    return cases


def test_no_malformed_body_gets_a_server_error(gateway):
    statuses: dict[int, int] = {}
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
    with httpx.Client(base_url=gateway, timeout=300) as http:
        for endpoint, raw in bodies():
            response = http.post(path[endpoint], content=raw, headers={"content-type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (response.status_code, raw[:200], response.text[:300])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert error["message"] and error["code"] == response.status_code, response.text[:300]
            elif response.headers["content-type"].startswith("application/json"):
                assert response.json().get("choices") is not None
        assert http.post(path["chat"], json=GOOD["chat"]).status_code == 200
    print(f"\nbodies tried: {sum(statuses.values())}, statuses: {dict(sorted(statuses.items()))}")
