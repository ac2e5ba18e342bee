"""Per-priority request figures: counters, histograms and percentiles, rendered as Prometheus text or JSON.

Pure bookkeeping with no Ray in it; the metrics actor owns one `GatewayStats`.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from serve_app.errors import ErrorKind
from serve_app.policy.priority import Priority

Outcome = Literal["completed", "rejected", "cancelled", "error"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "rejected", "cancelled", "error")
PRIORITIES = tuple(p.label for p in Priority)

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# name -> (help text, buckets)
HISTOGRAMS: dict[str, tuple[str, Sequence[float]]] = {
    "queue_wait_seconds": ("Time a request waited in the router's priority queue", SECONDS_BUCKETS),
    "time_to_first_token_seconds": ("Arrival at the router to the first generated token", SECONDS_BUCKETS),
    "e2e_latency_seconds": ("Arrival at the router to the last byte of the response", SECONDS_BUCKETS),
    "output_tokens": ("Generated tokens per completed request", TOKEN_BUCKETS),
}


@dataclass
class RequestRecord:
    """What the router knows about one request once it has ended."""

    priority: str
    outcome: Outcome
    kind: ErrorKind | None = None  # why it was rejected, cancelled or failed
    endpoint: str = "chat"
    admitted: bool = False  # it got a replica slot
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int | None = None
    preemptions: int = 0  # times it gave up its slot, before its first token, to a waiting high request
    retried: bool = False  # sent again after its replica failed before the first byte

    def __post_init__(self) -> None:
        if self.kind is not None:
            self.kind = ErrorKind(self.kind)  # from a dict that crossed Ray as plain data

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": self.kind and self.kind.value}


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1
        self.recent.append(value)

    def summary(self) -> dict[str, float | int | None]:
        """Percentiles over the most recent 10,000 samples, so a long-lived gateway stays cheap."""
        ordered = sorted(self.recent)
        return {
            "count": self.n,
            "mean": self.total / self.n if self.n else None,
            "p50": percentile(ordered, 50),
            "p95": percentile(ordered, 95),
            "p99": percentile(ordered, 99),
        }


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, the same definition as numpy's default."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class ClassStats:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.admitted = 0
        self.preempted = 0
        self.retried = 0
        self.histograms = {name: Histogram(buckets) for name, (_, buckets) in HISTOGRAMS.items()}

    def add(self, record: RequestRecord) -> None:
        self.outcomes[record.outcome] += 1
        if record.kind and record.outcome != "completed":
            self.errors[f"{record.outcome}:{record.kind}"] += 1
        if record.admitted:
            self.admitted += 1
        self.preempted += record.preemptions
        self.retried += record.retried
        for name, value in (
            ("queue_wait_seconds", record.queue_wait_s),
            ("time_to_first_token_seconds", record.ttft_s),
            ("e2e_latency_seconds", record.e2e_s if record.outcome == "completed" else None),
            ("output_tokens", record.output_tokens if record.outcome == "completed" else None),
        ):
            if value is not None:
                self.histograms[name].observe(value)


class GatewayStats:
    def __init__(self) -> None:
        self.classes = {label: ClassStats() for label in PRIORITIES}

    def add_many(self, records: Iterable[RequestRecord | dict[str, Any]]) -> None:
        for record in records:
            if isinstance(record, dict):
                record = RequestRecord(**record)
            self.classes[record.priority].add(record)

    def summary(self, gateway_state: dict[str, Any] | None = None) -> dict[str, Any]:
        per_priority = {}
        for label, stats in self.classes.items():
            per_priority[label] = {
                "admitted": stats.admitted,
                "preempted": stats.preempted,
                "retried": stats.retried,
                **{outcome: stats.outcomes[outcome] for outcome in OUTCOMES},
                "errors_by_kind": dict(stats.errors),
                **{name: hist.summary() for name, hist in stats.histograms.items()},
            }
        return {"object": "gateway.stats", "priorities": per_priority, "router": gateway_state or {}}

    def prometheus(self, gateway_state: dict[str, Any] | None = None) -> str:
        lines: list[str] = []

        def header(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        header("gateway_requests_total", "counter", "Requests that ended, by priority and outcome")
        for label, stats in self.classes.items():
            for outcome in OUTCOMES:
                lines.append(
                    f'gateway_requests_total{{priority="{label}",outcome="{outcome}"}} {stats.outcomes[outcome]}'
                )
        header("gateway_admitted_total", "counter", "Requests that got a replica slot")
        for label, stats in self.classes.items():
            lines.append(f'gateway_admitted_total{{priority="{label}"}} {stats.admitted}')
        header("gateway_preempted_total", "counter", "Times a request gave up its slot before its first token")
        for label, stats in self.classes.items():
            lines.append(f'gateway_preempted_total{{priority="{label}"}} {stats.preempted}')
        header("gateway_retried_total", "counter", "Requests sent again after a replica failed before the first byte")
        for label, stats in self.classes.items():
            lines.append(f'gateway_retried_total{{priority="{label}"}} {stats.retried}')
        header("gateway_errors_total", "counter", "Rejected, cancelled and failed requests by kind")
        for label, stats in self.classes.items():
            for key, count in sorted(stats.errors.items()):
                outcome, kind = key.split(":", 1)
                lines.append(f'gateway_errors_total{{priority="{label}",outcome="{outcome}",kind="{kind}"}} {count}')
        for name, (help_text, buckets) in HISTOGRAMS.items():
            metric = f"gateway_{name}"
            header(metric, "histogram", help_text)
            for label, stats in self.classes.items():
                hist = stats.histograms[name]
                cumulative = 0
                for bound, count in zip([*buckets, math.inf], hist.counts, strict=True):
                    cumulative += count
                    le = "+Inf" if bound == math.inf else repr(float(bound))
                    lines.append(f'{metric}_bucket{{priority="{label}",le="{le}"}} {cumulative}')
                lines.append(f'{metric}_sum{{priority="{label}"}} {hist.total}')
                lines.append(f'{metric}_count{{priority="{label}"}} {hist.n}')
        for key, value in (gateway_state or {}).items():
            header(f"gateway_{key}", "gauge", f"Gateway {key.replace('_', ' ')}, now")
            lines.append(f"gateway_{key} {value}")
        return "\n".join(lines) + "\n"
