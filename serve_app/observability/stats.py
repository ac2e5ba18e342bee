"""Per-priority request figures: counters, histograms and percentiles, as JSON or through `prometheus_client`.

Bookkeeping with no Ray in it; the metrics actor owns one `GatewayStats`. What each figure is called
on either side is in `catalog`; `prometheus_client` writes the text (names, types, escaping, HELP).
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from serve_app.errors import ErrorKind
from serve_app.observability import catalog
from serve_app.policy.priority import Priority

Outcome = Literal["completed", "rejected", "cancelled", "error"]
OUTCOMES: tuple[Outcome, ...] = ("completed", "rejected", "cancelled", "error")
PRIORITIES = tuple(p.label for p in Priority)


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
        self.histograms = {d.summary_key: Histogram(d.buckets) for d in catalog.DISTRIBUTIONS}

    def add(self, record: RequestRecord) -> None:
        self.outcomes[record.outcome] += 1
        if record.kind and record.outcome != "completed":
            self.errors[f"{record.outcome}:{record.kind}"] += 1
        if record.admitted:
            self.admitted += 1
        self.preempted += record.preemptions
        self.retried += record.retried
        for figure in catalog.DISTRIBUTIONS:
            value = getattr(record, figure.field)
            if value is not None and (record.outcome == "completed" or not figure.completed_only):
                self.histograms[figure.summary_key].observe(value)


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
        """The Prometheus exposition of these figures and of Admission's live state."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, gateway_state or {}))
        return generate_latest(registry).decode()


class _Collector:
    """A `prometheus_client` collector over `GatewayStats`: families built at each scrape from the catalog."""

    def __init__(self, stats: GatewayStats, state: dict[str, Any]) -> None:
        self.stats = stats
        self.state = state

    def collect(self) -> Iterator[Metric]:
        classes = self.stats.classes
        requests = CounterMetricFamily(
            catalog.REQUESTS.prometheus, catalog.REQUESTS.help, labels=["priority", "outcome"]
        )
        errors = CounterMetricFamily(
            catalog.ERRORS.prometheus, catalog.ERRORS.help, labels=["priority", "outcome", "kind"]
        )
        for label, stats in classes.items():
            for outcome in OUTCOMES:
                requests.add_metric([label, outcome], stats.outcomes[outcome])
            for key, count in sorted(stats.errors.items()):
                errors.add_metric([label, *key.split(":", 1)], count)
        yield requests
        yield errors
        for count, attribute in (
            (catalog.ADMITTED, "admitted"),
            (catalog.PREEMPTIONS, "preempted"),
            (catalog.RETRIES, "retried"),
        ):
            family = CounterMetricFamily(count.prometheus, count.help, labels=["priority"])
            for label, stats in classes.items():
                family.add_metric([label], getattr(stats, attribute))
            yield family
        for figure in catalog.DISTRIBUTIONS:
            histogram = HistogramMetricFamily(figure.prometheus, figure.help, labels=["priority"])
            for label, stats in classes.items():
                hist = stats.histograms[figure.summary_key]
                cumulative, buckets = 0, []
                for bound, count in zip([*figure.buckets, math.inf], hist.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == math.inf else str(float(bound)), cumulative))
                histogram.add_metric([label], buckets, hist.total)
            yield histogram
        yield from self._state()

    def _state(self) -> Iterator[Metric]:
        state = self.state
        if not state:
            return
        for gauge in catalog.STATE_PER_PRIORITY:
            family = _family(gauge, ["priority"])
            for label in PRIORITIES:
                family.add_metric([label], state.get(f"{gauge.state_key}_{label}", 0) * gauge.scale)
            yield family
        for gauge in catalog.STATE:
            if gauge.state_key in state:
                family = _family(gauge, [])
                family.add_metric([], state[gauge.state_key] * gauge.scale)
                yield family
        replicas = state.get("replica_detail") or []
        for gauge in catalog.STATE_PER_REPLICA:
            family = _family(gauge, ["replica"])
            for replica in replicas:
                if replica.get(gauge.state_key) is not None:  # an engine's figure not read yet
                    family.add_metric([replica["replica"]], replica[gauge.state_key] * gauge.scale)
            yield family


def _family(gauge: catalog.Gauge, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    kind = CounterMetricFamily if gauge.counter else GaugeMetricFamily
    return kind(gauge.prometheus, gauge.help, labels=labels)
