"""The relay's byte helpers: what the Router finds in vLLM's events without parsing the stream."""

from __future__ import annotations

import json

from serve_app.errors import ErrorKind, GatewayError
from serve_app.http import relay


def event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()  # compact, as vLLM writes it


CHUNK = event({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})


def test_the_usage_event_gives_the_tokens_and_goes_unless_the_client_asked_for_it():
    data = CHUNK + USAGE + relay.DONE
    assert relay.take_usage(data, keep=True) == (data, 7)
    assert relay.take_usage(data, keep=False) == (CHUNK + relay.DONE, 7)


def test_a_read_without_usage_passes_unchanged():
    assert relay.take_usage(CHUNK, keep=False) == (CHUNK, None)


def test_a_usage_event_cut_across_reads_is_left_as_it_is():
    cut = (CHUNK + USAGE)[: len(CHUNK) + 40]
    assert relay.take_usage(cut, keep=False) == (cut, None)


def test_a_whole_answer_gives_its_completion_tokens():
    assert relay.completion_tokens(b'{"usage": {"prompt_tokens": 2, "completion_tokens": 12}}') == 12
    assert relay.completion_tokens(b'{"choices": []}') is None


def test_an_error_event_is_an_engine_error_for_a_5xx_and_the_requests_fault_for_a_4xx():
    assert relay.engine_error_kind(event({"error": {"message": "dead", "code": 500}})) is ErrorKind.ENGINE_ERROR
    assert relay.engine_error_kind(CHUNK + event({"error": {"message": "x", "code": 400}})) is ErrorKind.BAD_REQUEST
    assert relay.engine_error_kind(b'data: {"error": not json') is ErrorKind.ENGINE_ERROR
    assert relay.ERROR_EVENT in event({"error": {"code": 500}})


def test_an_error_answer_is_counted_by_its_status():
    assert relay.error_kind(503) is ErrorKind.ENGINE_ERROR
    assert relay.error_kind(404) is ErrorKind.NOT_FOUND
    assert relay.error_kind(418) is ErrorKind.BAD_REQUEST


def test_the_error_event_a_started_stream_ends_with():
    data = relay.error_event(GatewayError(502, "gone mid-stream", kind=ErrorKind.ENGINE_ERROR))
    assert data.endswith(relay.DONE)
    payload = json.loads(data.split(b"\n\n")[0].removeprefix(b"data: "))
    assert payload["error"] == {"message": "gone mid-stream", "type": "BadGateway", "param": None, "code": 502}


def test_an_error_answer_that_is_not_json_becomes_openai_error_json():
    assert relay.json_or_text(b'{"error": {"message": "m"}}') == {"error": {"message": "m"}}
    assert relay.json_or_text(b"Internal Server Error") == {"error": {"message": "Internal Server Error"}}
    assert relay.json_or_text(b"[1]") == {"error": {"message": "[1]"}}


def test_events_split_across_reads_come_out_whole_and_done_is_not_an_event():
    splitter = relay.EventSplitter()
    data = CHUNK + USAGE + relay.DONE
    out = splitter.feed(data[:5]) + splitter.feed(data[5 : len(CHUNK) + 9]) + splitter.feed(data[len(CHUNK) + 9 :])
    assert out == [json.loads(CHUNK[6:]), json.loads(USAGE[6:])]
