"""The gateway lowers its processes to nice 0 where it may, and says so where it may not."""

from __future__ import annotations

import logging
import os

import pytest

from serve_app.deployments import process_priority


def test_every_thread_is_lowered_to_nice_0(monkeypatch: pytest.MonkeyPatch) -> None:
    niceness = {tid: 15 for tid in (101, 102, 103)}
    monkeypatch.setattr(os, "getpriority", lambda which, who: max(niceness.values()))
    monkeypatch.setattr(os, "listdir", lambda path: [str(tid) for tid in niceness])
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: niceness.__setitem__(who, value))
    process_priority.restore_for_process("Router")
    assert niceness == {101: 0, 102: 0, 103: 0}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_without_the_privilege_it_warns_and_names_the_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "getpriority", lambda which, who: 15)
    monkeypatch.setattr(os, "listdir", lambda path: ["101"])
    monkeypatch.setattr(os, "setpriority", refuse)
    records = _Records()  # on the logger itself: Ray may stop "ray.serve" from propagating to pytest's
    process_priority.logger.addHandler(records)
    try:
        process_priority.restore_for_process("LLMServer")
    finally:
        process_priority.logger.removeHandler(records)
    assert len(records.messages) == 1
    assert "LLMServer runs at nice 15" in records.messages[0]
    assert "RAY_worker_niceness=0" in records.messages[0]


def test_a_process_already_at_nice_0_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(os, "getpriority", lambda which, who: 0)
    monkeypatch.setattr(os, "setpriority", lambda which, who, value: calls.append(who))
    process_priority.restore_for_process("Admission")
    assert calls == []
