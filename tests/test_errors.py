"""Every error a client sees: OpenAI's JSON, the status each refusal maps to, and the kind it is counted as."""

from __future__ import annotations

import pickle

import pytest

from serve_app.errors import ErrorKind, GatewayError, refusal_error
from serve_app.policy.priority import Priority
from serve_app.policy.refusals import NotReady, QueueFull, QueueTimeout, Shed


def test_gateway_error_is_openai_shaped_and_survives_pickling():
    error = GatewayError(429, "queue full", retry_after_s=3, kind="queue_full", headers={"X-Why": "load"})
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.retry_after_s, copy.kind, copy.headers) == (
        429,
        3,
        ErrorKind.QUEUE_FULL,
        {"X-Why": "load"},
    )
    assert copy.body() == {"error": {"message": "queue full", "type": "RateLimitError", "param": None, "code": 429}}
    response = copy.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "3"
    assert response.headers["x-why"] == "load"


@pytest.mark.parametrize(
    ("refusal", "status", "kind", "retry_after"),
    [
        (Shed(Priority.LOW, 90, 60, 30), 429, ErrorKind.SHED, 30),
        (QueueFull(Priority.MEDIUM, 4), 429, ErrorKind.QUEUE_FULL, 4),
        (QueueTimeout(Priority.HIGH, 30.0, 2), 429, ErrorKind.QUEUE_TIMEOUT, 2),
        (NotReady("the model is still loading"), 503, ErrorKind.NOT_READY, 5),
    ],
)
def test_each_refusal_is_one_status_and_kind_with_retry_after(refusal, status, kind, retry_after):
    error = refusal_error(refusal)
    assert (error.status, error.kind, error.retry_after_s) == (status, kind, retry_after)
    assert str(refusal) in error.message
    assert error.response().headers["retry-after"] == str(retry_after)


def test_a_refusal_may_carry_a_message_that_says_more():
    error = refusal_error(NotReady(), "recovering after a replica failure")
    assert error.message == "recovering after a replica failure" and error.status == 503


def test_an_engines_error_answer_is_counted_by_its_status_whatever_it_calls_itself():
    assert (
        GatewayError.from_body(404, {"error": {"message": "no model", "type": "NotFoundError"}}).kind
        is ErrorKind.NOT_FOUND
    )
    assert (
        GatewayError.from_body(500, {"error": {"message": "x", "type": "BadRequestError"}}).kind
        is ErrorKind.ENGINE_ERROR
    )
    odd = GatewayError.from_body(400, {"error": "a string"})
    assert (odd.kind, odd.message) == (ErrorKind.BAD_REQUEST, "{'error': 'a string'}")


def test_kinds_print_as_their_label():
    assert f"{ErrorKind.CLIENT_GONE}" == "client_gone" and str(ErrorKind.SHED) == "shed"
    assert (
        ErrorKind.for_status(405) is ErrorKind.METHOD_NOT_ALLOWED
        and ErrorKind.for_status(502) is ErrorKind.ENGINE_ERROR
    )
