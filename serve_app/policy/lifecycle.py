"""A request's life in a Router, and the one decision about what a failure on the way leads to. Pure.

    QUEUED ──grant──► SENT ──stream headers──► STREAMING ──first byte──► ANSWERING ──► FINISHED
      ▲                 │                          │
      └── RETRY / RESTART (back to the head of its class) ──┘

A request may go back to its queue only while its client has seen nothing: once a byte is out, a
second answer would repeat it. A replica that fails before then costs one retry on another replica;
a preemption (the Router closing a stream on purpose for a waiting high request) costs no retry.
"""

from __future__ import annotations

from enum import Enum


class Stage(Enum):
    QUEUED = "queued"  # waiting for a slot
    SENT = "sent"  # holds a slot; sent to a replica, awaiting its headers or its whole answer
    STREAMING = "streaming"  # relaying a stream that has not yet sent the client a byte
    ANSWERING = "answering"  # at least one byte went to the client
    FINISHED = "finished"  # counted; nothing more happens to it

    @property
    def preemptible(self) -> bool:
        """Only a stream whose client has seen nothing: a whole answer being read cannot be cut and restarted
        without a client-visible error, and an answer under way would be repeated."""
        return self is Stage.STREAMING


class Failure(Enum):
    UNREACHABLE = "unreachable"  # the replica could not be reached
    ENGINE_FAILED = "engine_failed"  # a 5xx, an engine error event, or a stream cut short
    PREEMPTED = "preempted"  # the Router closed the stream on purpose, for a waiting high request


class Next(Enum):
    RETRY = "retry"  # once per request, at the head of its class, on another replica if there is one
    RESTART = "restart"  # after a preemption: at the head of its class, not counted as the retry
    FAIL = "fail"  # the client gets an error (or the engine's own error answer)


def after_failure(stage: Stage, failure: Failure, retried: bool, shutting_down: bool = False) -> Next:
    """What a request does after `failure` in `stage`. `retried`: it has had its one retry. `shutting_down`:
    the Router is past its drain timeout, and what still runs is cut, not sent again."""
    if shutting_down or stage not in (Stage.SENT, Stage.STREAMING):
        return Next.FAIL
    if failure is Failure.PREEMPTED:
        return Next.RESTART if stage.preemptible else Next.FAIL
    return Next.FAIL if retried else Next.RETRY
