"""The access log (`access_log: true`): one JSON line per finished request on the `serve_app.access` logger.

Written where the Router finishes a request, so every request that got as far as the Router is in it:
completed, rejected (429/503), cancelled (client gone) or failed. Tenants are named by their API key's
name or the body's `user`, never by a key.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from serve_app.observability.stats import RequestRecord

LOGGER_NAME = "serve_app.access"
logger = logging.getLogger(LOGGER_NAME)


def enable() -> None:
    """Lines go to the replica's stderr (in Ray, its worker log), bare JSON, unless the logger was given a
    handler already; they do not also go up to the root logger, whose format would wrap them."""
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def write(record: RequestRecord, flight: Any) -> None:
    """`flight`: the Router's InFlight of the request (its id, model, tenant, replica and trace)."""
    trace_id = flight.trace.trace_id if flight.trace is not None else None
    logger.info(line(record, flight.request_id, flight.model, flight.tenant, flight.replica_url, trace_id))


def line(
    record: RequestRecord,
    request_id: str,
    model: str | None,
    tenant: str | None,
    replica: str | None,
    trace_id: str | None,
) -> str:
    """One request as a JSON object on one line; times in milliseconds, null where it never got that far."""
    return json.dumps(
        {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "trace_id": trace_id,
            "class": record.priority,
            "endpoint": record.endpoint,
            "model": model,
            "tenant": tenant,
            "outcome": record.outcome,
            "error_kind": record.kind.value if record.kind is not None else None,
            "queue_wait_ms": _ms(record.queue_wait_s),
            "ttft_ms": _ms(record.ttft_s),
            "e2e_ms": _ms(record.e2e_s),
            "output_tokens": record.output_tokens,
            "replica": replica,
            "retried": record.retried,
            "preemptions": record.preemptions,
        },
        separators=(",", ":"),  # ASCII: a lone surrogate in a client's `model` cannot break the line
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
