"""Every branch of what a failure leads to."""

from __future__ import annotations

import pytest

from serve_app.policy.lifecycle import Failure, Next, Stage, after_failure

BEFORE_A_BYTE = (Stage.SENT, Stage.STREAMING)
ENGINE_FAILURES = (Failure.UNREACHABLE, Failure.ENGINE_FAILED)


@pytest.mark.parametrize("stage", BEFORE_A_BYTE)
@pytest.mark.parametrize("failure", ENGINE_FAILURES)
def test_a_replica_failure_before_the_first_byte_is_retried_once(stage, failure):
    assert after_failure(stage, failure, retried=False) is Next.RETRY
    assert after_failure(stage, failure, retried=True) is Next.FAIL


@pytest.mark.parametrize("failure", ENGINE_FAILURES + (Failure.PREEMPTED,))
def test_once_a_byte_is_out_every_failure_fails(failure):
    assert after_failure(Stage.ANSWERING, failure, retried=False) is Next.FAIL


def test_a_preempted_stream_restarts_without_using_its_retry():
    assert after_failure(Stage.STREAMING, Failure.PREEMPTED, retried=False) is Next.RESTART
    assert after_failure(Stage.STREAMING, Failure.PREEMPTED, retried=True) is Next.RESTART


def test_a_whole_answer_is_not_preemptible():
    assert not Stage.SENT.preemptible
    assert after_failure(Stage.SENT, Failure.PREEMPTED, retried=False) is Next.FAIL


@pytest.mark.parametrize("stage", BEFORE_A_BYTE)
@pytest.mark.parametrize("failure", list(Failure))
def test_nothing_is_sent_again_past_the_routers_drain_timeout(stage, failure):
    assert after_failure(stage, failure, retried=False, shutting_down=True) is Next.FAIL


@pytest.mark.parametrize("stage", (Stage.QUEUED, Stage.FINISHED))
def test_a_request_without_a_replica_has_nothing_to_retry(stage):
    assert after_failure(stage, Failure.ENGINE_FAILED, retried=False) is Next.FAIL


def test_only_a_stream_that_sent_nothing_can_be_preempted():
    assert [s for s in Stage if s.preemptible] == [Stage.STREAMING]
