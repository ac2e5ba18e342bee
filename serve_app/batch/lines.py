"""The OpenAI Batch API's formats: input lines checked one by one, the output and error lines, the batch and file
objects. Pure: no Ray, no HTTP, no storage.

A bad line never fails the batch: it becomes a line of the error file under its `custom_id`."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

# What a batch may run, by the `url` of its lines and the `endpoint` of the batch.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_LINES = 50_000  # OpenAI's own bound on a batch's requests

# The states of a batch, as OpenAI names them, and those after which nothing more runs.
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED = "validating", "in_progress", "finalizing", "completed"
FAILED, EXPIRED, CANCELLING, CANCELLED = "failed", "expired", "cancelling", "cancelled"
FINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)


class BatchInputError(ValueError):
    """The input file as a whole cannot make a batch (the batch fails, with this as its error)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Line:
    """One line of an input file: `request` is the body to run, or None when the line is bad (`error` says why)."""

    number: int  # 1-based, as an editor shows it
    custom_id: str | None
    request: dict[str, Any] | None
    error: dict[str, str] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def parse_input(data: bytes, endpoint: str) -> list[Line]:
    """Every non-blank line of a JSONL input file, checked against the batch's endpoint. Raises BatchInputError
    only for what fails the whole batch: not UTF-8, no line at all, too many lines."""
    if endpoint not in ENDPOINTS:
        raise BatchInputError("invalid_endpoint", f"endpoint must be one of {', '.join(ENDPOINTS)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchInputError("invalid_file", "the input file is not UTF-8 text (JSONL)") from None
    rows = [(n, raw) for n, raw in enumerate(text.splitlines(), 1) if raw.strip()]
    if not rows:
        raise BatchInputError("empty_file", "the input file has no request lines")
    if len(rows) > MAX_LINES:
        raise BatchInputError("too_many_requests", f"a batch takes at most {MAX_LINES} lines; this one has {len(rows)}")
    seen: set[str] = set()
    lines = []
    for number, raw in rows:
        line = _check_line(number, raw, endpoint)
        if line.custom_id is not None and line.request is not None:
            if line.custom_id in seen:
                line = Line(number, line.custom_id, None, _error("duplicate_custom_id", "custom_id used twice", number))
            seen.add(line.custom_id)
        lines.append(line)
    return lines


def _error(code: str, message: str, number: int) -> dict[str, str]:
    return {"code": code, "message": f"line {number}: {message}"}


def _check_line(number: int, raw: str, endpoint: str) -> Line:
    try:
        entry = json.loads(raw)
    except json.JSONDecodeError as exc:
        return Line(number, None, None, _error("invalid_json", f"not JSON ({exc.msg})", number))
    if not isinstance(entry, dict):
        return Line(number, None, None, _error("invalid_json", "not a JSON object", number))
    custom_id = entry.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(number, None, None, _error("missing_custom_id", "custom_id must be a non-empty string", number))
    problem = None
    if entry.get("method", "POST") != "POST":
        problem = ("invalid_method", "method must be POST")
    elif entry.get("url") != endpoint:
        problem = ("mismatched_url", f"url must be the batch's endpoint {endpoint}, not {entry.get('url')!r}")
    elif not isinstance(entry.get("body"), dict):
        problem = ("invalid_body", "body must be a JSON object")
    elif entry["body"].get("stream"):
        problem = ("invalid_body", "stream is not supported in a batch")
    elif not isinstance(entry["body"].get("model"), str):
        problem = ("invalid_body", "body.model must be given")
    if problem is not None:
        return Line(number, custom_id, None, _error(*problem, number))
    return Line(number, custom_id, entry["body"])


def output_line(custom_id: str, status: int, body: Any, request_id: str) -> dict[str, Any]:
    """A line of the output file (status 200) or of the error file (an answer with an error status)."""
    return {
        "id": new_id("batch_req"),
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    }


def error_line(custom_id: str | None, error: dict[str, str]) -> dict[str, Any]:
    """A line of the error file for a request that never ran: a bad line, or one cut by cancel or expiry."""
    return {"id": new_id("batch_req"), "custom_id": custom_id, "response": None, "error": error}


def batch_object(
    batch_id: str, endpoint: str, input_file_id: str, window: str, created_at: int, metadata: dict[str, str] | None
) -> dict[str, Any]:
    """A new batch as OpenAI's SDK reads it: every field present, the timestamps unset."""
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": VALIDATING,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created_at,
        "in_progress_at": None,
        "expires_at": created_at + COMPLETION_WINDOWS[window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


def file_object(file_id: str, size: int, created_at: int, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
