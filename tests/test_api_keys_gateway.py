"""API keys on the real gateway: a second application with keys on, beside the suite's (keys off)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from conftest import MODEL_ID, delete_app, wait_for, wait_until_ready

pytestmark = pytest.mark.engine

PORT = 8323
APP = "keyed"
URL = f"http://127.0.0.1:{PORT}"
SHORT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def keyed(gateway, tmp_path_factory):
    from ray import serve

    from serve_app.app import build_app

    key_file = tmp_path_factory.mktemp("keys") / "keys.yaml"
    key_file.write_text("sk-user:\n  name: user\n  max_priority: medium\n  output_tokens_per_min: 60\n")
    args = {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 4},
            "autoscaling": {"max_replicas": 1, "target_ongoing_requests": 2, "max_ongoing_requests": 4},
        },
        "auth": {
            "keys": {
                "sk-admin": {"name": "ops", "admin": True},
                "sk-batch": {"name": "batch", "max_priority": "low", "requests_per_s": 0.2},
            },
            "key_file": str(key_file),
        },
        "http": {"host": "127.0.0.1", "port": PORT},
        "batch": {"directory": str(tmp_path_factory.mktemp("batches"))},
    }
    started = time.monotonic()
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}", blocking=False)
    wait_until_ready(URL, started)
    yield URL
    delete_app(APP)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_missing_or_unknown_key_gets_401_and_health_stays_open(keyed):
    for headers in ({}, auth("sk-nope"), {"Authorization": "sk-admin"}):
        response = httpx.post(f"{keyed}/v1/chat/completions", json=SHORT, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "AuthenticationError"
        assert "sk-" not in response.text, "no key is echoed"
    assert httpx.get(f"{keyed}/v1/models").status_code == 401
    assert httpx.get(f"{keyed}/v1/models", headers=auth("sk-user")).status_code == 200
    assert httpx.get(f"{keyed}/health").status_code == 200


def test_a_class_above_the_key_is_capped_and_the_response_says_so(keyed):
    response = httpx.post(
        f"{keyed}/v1/chat/completions", json=SHORT, headers={**auth("sk-admin"), "X-Priority": "high"}, timeout=60
    )
    assert response.status_code == 200 and response.headers["x-priority"] == "high"
    response = httpx.post(
        f"{keyed}/v1/chat/completions", json=SHORT, headers={**auth("sk-user"), "X-Priority": "high"}, timeout=60
    )
    assert response.status_code == 200 and response.headers["x-priority"] == "medium"


def test_request_and_token_rate_limits_answer_429_with_retry_after(keyed):
    first = httpx.post(f"{keyed}/v1/chat/completions", json=SHORT, headers=auth("sk-batch"), timeout=60)
    assert first.status_code == 200 and first.headers["x-priority"] == "low"
    second = httpx.post(f"{keyed}/v1/chat/completions", json=SHORT, headers=auth("sk-batch"), timeout=60)
    assert second.status_code == 429, "0.2 requests/s: one request per 5 s"
    assert second.json()["error"]["type"] == "RateLimitError"
    assert 1 <= int(second.headers["retry-after"]) <= 5
    # 60 output tokens per minute: a 100-token answer overdraws it by 40 or more, for 40 s or more.
    body = {**SHORT, "max_tokens": 100, "ignore_eos": True}
    spent = httpx.post(f"{keyed}/v1/chat/completions", json=body, headers=auth("sk-user"), timeout=120)
    assert spent.status_code == 200
    # The tokens are charged when the Router's release reaches Admission, just after the answer: in the same
    # call that frees the request's slot, so once /health shows no slot in use, the charge has landed.
    charged = wait_for(lambda: httpx.get(f"{keyed}/health").json().get("in_flight") == 0, timeout_s=30)
    assert charged, "the answered request's slot was never released"
    limited = httpx.post(f"{keyed}/v1/chat/completions", json=SHORT, headers=auth("sk-user"), timeout=60)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 30


def test_metrics_and_stats_need_an_admin_key(keyed):
    for path in ("/metrics", "/v1/stats"):
        assert httpx.get(f"{keyed}{path}").status_code == 401
        assert httpx.get(f"{keyed}{path}", headers=auth("sk-user")).status_code == 403
        assert httpx.get(f"{keyed}{path}", headers=auth("sk-admin")).status_code == 200
    stats = httpx.get(f"{keyed}/v1/stats", headers=auth("sk-admin")).json()
    assert stats["priorities"]["low"]["errors_by_kind"].get("rejected:rate_limited", 0) >= 1


def test_openai_sdk_sends_its_key_and_gets_typed_errors(keyed):
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-admin", max_retries=0)
    answer = client.chat.completions.create(**SHORT)
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(**SHORT)


def test_a_batch_and_its_files_are_seen_by_the_key_that_made_them_and_by_an_admin_only(keyed):
    from test_batch_api import CHAT, jsonl, request_line, until_final

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{keyed}/v1", api_key=key, max_retries=0, timeout=60)

    owner, other, admin = client("sk-user"), client("sk-batch"), client("sk-admin")
    upload = owner.files.create(file=("in.jsonl", (request_line("mine", "Hi") + "\n").encode()), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(upload.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    batch = owner.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")

    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in other.batches.list(limit=100).data]
    assert upload.id not in [f.id for f in other.files.list().data]
    assert batch.id in [b.id for b in admin.batches.list(limit=100).data]
    assert upload.id in [f.id for f in admin.files.list().data]

    done = until_final(owner, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 1, done
    assert admin.batches.retrieve(batch.id).output_file_id == done.output_file_id
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert [line["custom_id"] for line in jsonl(owner, done.output_file_id)] == ["mine"]
