"""The Batch API's pure parts: the input lines' checks, the store (SQLite and a folder), the runner's fair
shares, and the batch class's place below the interactive ones. No Ray, no engine; milliseconds."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from serve_app.batch import lines as fmt
from serve_app.batch.fair_share import next_batches
from serve_app.batch.store import DONE, FAILED, SqliteBatchStore
from serve_app.policy.priority import InvalidPriority, Priority, parse_priority
from serve_app.policy.request_queue import ClassLimits, PriorityRequestQueue

CHAT = "/v1/chat/completions"


def line(custom_id: str, url: str = CHAT, **body) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_good_lines_run_and_each_bad_line_is_reported_alone_under_its_custom_id():
    text = "\n".join(
        [
            line("a"),
            "not json",
            line("b", url="/v1/completions"),
            line("a"),  # a duplicate id
            json.dumps({"method": "POST", "url": CHAT, "body": {}}),  # no custom_id
            "",
            line("c", stream=True),
            json.dumps({"custom_id": "d", "url": CHAT, "body": {"messages": []}}),  # no model
            line("e"),
        ]
    )
    parsed = fmt.parse_input(text.encode(), CHAT)
    assert [(p.number, p.custom_id, p.request is not None) for p in parsed] == [
        (1, "a", True),
        (2, None, False),
        (3, "b", False),
        (4, "a", False),
        (5, None, False),
        (7, "c", False),
        (8, "d", False),
        (9, "e", True),
    ]
    codes = [p.error["code"] for p in parsed if p.error]
    assert codes == [
        "invalid_json",
        "mismatched_url",
        "duplicate_custom_id",
        "missing_custom_id",
        "invalid_body",
        "invalid_body",
    ]
    assert all(p.error["message"].startswith(f"line {p.number}:") for p in parsed if p.error)


@pytest.mark.parametrize(
    ("data", "endpoint", "code"),
    [(b"", CHAT, "empty_file"), (b"\xff\xfe", CHAT, "invalid_file"), (b"{}", "/v1/embeddings", "invalid_endpoint")],
)
def test_what_fails_a_whole_batch(data, endpoint, code):
    with pytest.raises(fmt.BatchInputError) as caught:
        fmt.parse_input(data, endpoint)
    assert caught.value.code == code


def test_a_file_is_whole_or_absent_and_belongs_to_its_owner(tmp_path):
    store = SqliteBatchStore(str(tmp_path))
    file = fmt.file_object("file_1", 3, 10, "in.jsonl", "batch")
    store.add_file(file, "alice", b"abc")
    assert store.file("file_1") == (file, "alice") and store.file_bytes("file_1") == b"abc"
    assert store.files("bob") == [] and store.files("alice") == [file] and store.files(None) == [file]
    assert not list((tmp_path / "files").glob(".upload-*")), "no temporary file left"
    with pytest.raises(KeyError):
        store.file_bytes("../batches.sqlite3")
    assert store.delete_file("file_1") and not store.delete_file("file_1")
    assert store.file("file_1") is None and not (tmp_path / "files" / "file_1").exists()


def test_a_line_is_answered_once_and_a_reopened_store_resumes_where_it_was(tmp_path):
    store = SqliteBatchStore(str(tmp_path))
    batch = fmt.batch_object("batch_1", CHAT, "file_1", "24h", 100, None)
    store.add_batch(batch, "alice")
    store.add_lines("batch_1", fmt.parse_input("\n".join([line("a"), "oops", line("b"), line("c")]).encode(), CHAT))
    assert store.counts("batch_1") == {"total": 4, "completed": 0, "failed": 1}
    assert [n for n, _, _ in store.pending("batch_1", 10, set())] == [1, 3, 4]
    assert [n for n, _, _ in store.pending("batch_1", 1, {1})] == [3], "lines running now are skipped"

    store.finish_line("batch_1", 1, DONE, {"status_code": 200, "body": {"x": 1}, "request_id": "r1"})
    store.finish_line("batch_1", 1, DONE, {"status_code": 200, "body": {"x": 2}, "request_id": "r2"})
    store.finish_line("batch_1", 3, FAILED, {"status_code": 400, "body": {"error": {}}, "request_id": "r3"})
    store.close()

    store = SqliteBatchStore(str(tmp_path))  # as after a restart
    assert store.batch("batch_1") == (batch, "alice")
    assert [n for n, _, _ in store.pending("batch_1", 10, set())] == [4]
    assert [r["result"]["body"] for r in store.results("batch_1", DONE)] == [{"x": 1}], "the first answer stays"
    assert store.fail_pending("batch_1", {"code": "batch_cancelled", "message": "cancelled"}) == 1
    assert store.counts("batch_1") == {"total": 4, "completed": 1, "failed": 3}
    failed = [(r["number"], r["custom_id"], "error" in r["result"]) for r in store.results("batch_1", FAILED)]
    assert failed == [(2, None, True), (3, "b", False), (4, "c", True)]
    updated = store.update_batch("batch_1", status=fmt.IN_PROGRESS, in_progress_at=101)
    assert [b["status"] for b, _ in store.batches(None, (fmt.IN_PROGRESS,))] == [fmt.IN_PROGRESS] == [updated["status"]]
    assert store.batches("bob") == []


def test_only_one_runner_holds_a_store_until_it_closes(tmp_path):
    first, second = SqliteBatchStore(str(tmp_path)), SqliteBatchStore(str(tmp_path))
    assert first.claim_runner() and first.claim_runner(), "claiming again is harmless"
    assert not second.claim_runner()
    first.close()
    assert second.claim_runner()


def test_fair_shares_go_to_the_owner_with_fewest_lines_running_then_to_its_batches_in_turn():
    active = [("b1", "alice"), ("b2", "alice"), ("b3", "bob")]
    assert next_batches(active, Counter(), 4) == ["b1", "b3", "b2", "b3"]
    assert next_batches(active, Counter({"b3": 3}), 3) == ["b1", "b2", "b1"]
    assert next_batches(active, Counter(), 0) == [] and next_batches([], Counter(), 5) == []


def test_batch_lines_wait_behind_every_interactive_class_however_long_they_wait():
    queue = PriorityRequestQueue({p: ClassLimits(10, 1e9) for p in Priority}, aging_s=1.0)
    queue.push(Priority.BATCH, now=0.0, payload="batch")
    queue.push(Priority.LOW, now=99.0, payload="low")
    assert queue.pop(now=100.0).payload == "low", "a batch line that waited 100 aging periods still goes last"
    assert queue.pop(now=100.0).payload == "batch"


def test_a_client_cannot_ask_for_the_batch_class():
    assert parse_priority("low") is Priority.LOW
    with pytest.raises(InvalidPriority):
        parse_priority("batch")
