"""The OpenAI Batch API on the real gateway, driven by the OpenAI SDK as a user drives it (issue 22): a batch runs
to the end with its output matching its input line by line and its bad lines in the error file; a cancelled
batch stops taking slots; a high request goes ahead of every batch line waiting; the API's errors are OpenAI's."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from conftest import MODEL_ID, stats, wait_for

pytestmark = pytest.mark.engine

CHAT = "/v1/chat/completions"
FINAL = ("completed", "failed", "expired", "cancelled")


def sdk(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=120)


def request_line(custom_id: str, content: str, max_tokens: int = 4) -> str:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if max_tokens > 4:
        body["ignore_eos"] = True
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


def submit(client: openai.OpenAI, lines: list[str]) -> str:
    upload = client.files.create(file=("input.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="24h")
    assert batch.status == "validating" and batch.input_file_id == upload.id
    return batch.id


def until_final(client: openai.OpenAI, batch_id: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout_s:.0f}s: {batch}"
        time.sleep(0.5)


def jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def nothing_running(gateway: str) -> dict:
    """Admission's state once no slot is held and nothing waits, batch lines included."""
    done = stats(
        gateway,
        until=lambda s: s["router"]["in_flight"] == 0 and s["router"]["queued_batch"] == 0,
        settle=False,
        timeout_s=120,
    )
    return done["router"]


def test_a_batch_runs_through_the_gateway_and_its_output_matches_its_input(gateway):
    client = sdk(gateway)
    good = [request_line(f"q{i}", f"Say the number {i}.") for i in range(4)]
    bad = ["{not json", json.dumps({"custom_id": "wrong-url", "method": "POST", "url": "/v1/embeddings", "body": {}})]
    batch_id = submit(client, [good[0], bad[0], *good[1:3], bad[1], good[3]])

    batch = until_final(client, batch_id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 4, 2)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    output = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["q0", "q1", "q2", "q3"], "each line once, in input order"
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        answer = line["response"]["body"]
        assert answer["object"] == "chat.completion" and answer["model"] == MODEL_ID
        assert 0 < answer["usage"]["completion_tokens"] <= 4
    errors = jsonl(client, batch.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (None, "invalid_json"),
        ("wrong-url", "mismatched_url"),
    ]
    assert errors[0]["error"]["message"].startswith("line 2:")

    assert batch_id in [b.id for b in client.batches.list(limit=100).data]
    assert {batch.input_file_id, batch.output_file_id} <= {f.id for f in client.files.list().data}
    assert client.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(batch.input_file_id)
    priorities = stats(gateway)["priorities"]
    assert priorities["batch"]["completed"] >= 4, "the batch's lines are counted in their own class"
    nothing_running(gateway)


def test_the_batch_api_answers_mistakes_with_openai_errors(gateway):
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file_nope", endpoint=CHAT, completion_window="24h")
    upload = client.files.create(file=("in.jsonl", request_line("a", "hi").encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert "endpoint" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=upload.id, endpoint=CHAT, completion_window="1h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("in.jsonl", b"{}"), purpose="fine-tune")
    response = httpx.post(
        f"{gateway}/v1/files", files={"file": ("big.jsonl", b"x" * (65 * 1024))}, data={"purpose": "batch"}, timeout=30
    )
    assert response.status_code == 413 and "batch.max_file_bytes" in response.json()["error"]["message"]
    # An empty file fails the batch as a whole, with the reason in `errors`.
    empty = client.files.create(file=("empty.jsonl", b"\n"), purpose="batch")
    failed = until_final(
        client, client.batches.create(input_file_id=empty.id, endpoint=CHAT, completion_window="24h").id
    )
    assert failed.status == "failed" and failed.errors.data[0].code == "empty_file"


def test_a_cancelled_batch_stops_taking_slots_at_once(gateway):
    client = sdk(gateway)
    batch_id = submit(client, [request_line(f"c{i}", "Tell me a long story.", max_tokens=64) for i in range(12)])
    assert wait_for(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 1, timeout_s=300)
    client.batches.cancel(batch_id)
    batch = until_final(client, batch_id, timeout_s=120)
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    counts = batch.request_counts
    assert counts.total == 12 and counts.completed + counts.failed == 12 and counts.completed < 12
    cut = [e for e in jsonl(client, batch.error_file_id) if e["error"] and e["error"]["code"] == "batch_cancelled"]
    assert len(cut) == counts.failed and counts.failed >= 1
    state = nothing_running(gateway)
    assert state["in_flight"] == 0 and state["queued_batch"] == 0, state


def test_a_high_request_goes_ahead_of_every_batch_line_waiting(gateway):
    client = sdk(gateway)
    batch_id = submit(client, [request_line(f"h{i}", "Tell me a long story.", max_tokens=24) for i in range(8)])
    # Once lines wait in Admission's batch queue behind the one slot, a high request arrives.
    assert wait_for(lambda: stats(gateway, settle=False)["router"]["queued_batch"] >= 2, timeout_s=300)
    before = client.batches.retrieve(batch_id).request_counts.completed
    answered: dict = {}

    def high() -> None:
        answered["response"] = httpx.post(
            f"{gateway}/v1/chat/completions",
            json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers={"X-Priority": "high"},
            timeout=300,
        )
        answered["batch_done"] = client.batches.retrieve(batch_id).request_counts.completed

    thread = threading.Thread(target=high)
    thread.start()
    thread.join(timeout=300)
    assert answered["response"].status_code == 200, answered["response"].text
    # At most the line running when it arrived (and one whose answer was being recorded) finished before it.
    assert answered["batch_done"] - before <= 2, (before, answered["batch_done"])
    batch = until_final(client, batch_id)
    assert batch.status == "completed" and batch.request_counts.completed == 8, batch
    nothing_running(gateway)


def test_the_seeds_three_patterns_through_the_client_helpers(gateway, tmp_path, capsys):
    """Sync for high, an async fan-out for medium, a batch for bulk (`serve-app-batch`)."""
    from serve_app import batch_cli
    from serve_app.client import client, map_prompts

    high = client("high", base_url=gateway)
    answer = high.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content is not None

    answers = map_prompts(["one", "two", "three"], priority="medium", concurrency=2, base_url=gateway, max_tokens=4)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers), answers

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([*(request_line(f"p{i}", f"Item {i}") for i in range(3)), "{not json"]) + "\n")
    out = tmp_path / "results.jsonl"
    assert batch_cli.main(["--url", gateway, "submit", str(requests), "--out", str(out)]) == 0
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["p0", "p1", "p2"]
    errors = (tmp_path / "results.errors.jsonl").read_text().splitlines()
    assert [json.loads(x)["error"]["code"] for x in errors] == ["invalid_json"], "the bad line, beside the output"
    assert "completed" in capsys.readouterr().out
    with pytest.raises(ValueError):
        client("urgent")
