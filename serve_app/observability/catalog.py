"""Every figure the gateway publishes, named once: its Prometheus family and its OpenTelemetry instrument.

`stats.py` renders the Prometheus side (through `prometheus_client`) and `otel.py` the OpenTelemetry
side, both from these tables, so the two cannot record different things. Names follow Prometheus's
conventions: the unit in the name, `_total` on counters.
"""

from __future__ import annotations

from dataclasses import dataclass

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Distribution:
    """A per-request value, recorded per priority and outcome as a histogram."""

    field: str  # RequestRecord's field
    summary_key: str  # its key in /v1/stats
    prometheus: str
    otel: str
    unit: str  # OpenTelemetry's unit
    help: str
    buckets: tuple[float, ...]
    completed_only: bool  # recorded only for requests that completed (a fast 429 has no e2e latency to speak of)


DISTRIBUTIONS = (
    Distribution(
        "queue_wait_s",
        "queue_wait_seconds",
        "gateway_queue_wait_seconds",
        "gateway.queue_wait",
        "s",
        "Time a request waited in the gateway's priority queue for a replica slot",
        SECONDS_BUCKETS,
        False,
    ),
    Distribution(
        "ttft_s",
        "time_to_first_token_seconds",
        "gateway_time_to_first_token_seconds",
        "gateway.time_to_first_token",
        "s",
        "Arrival at the gateway to the first byte of the answer",
        SECONDS_BUCKETS,
        False,
    ),
    Distribution(
        "e2e_s",
        "e2e_latency_seconds",
        "gateway_e2e_latency_seconds",
        "gateway.e2e_latency",
        "s",
        "Arrival at the gateway to the last byte of a completed answer",
        SECONDS_BUCKETS,
        True,
    ),
    Distribution(
        "output_tokens",
        "output_tokens",
        "gateway_output_tokens",
        "gateway.output_tokens",
        "{token}",
        "Generated tokens per completed request",
        TOKEN_BUCKETS,
        True,
    ),
)


@dataclass(frozen=True)
class Count:
    """A per-priority counter of finished requests."""

    summary_key: str  # its key in /v1/stats
    prometheus: str  # without `_total`, which prometheus_client adds
    otel: str
    help: str


REQUESTS = Count("", "gateway_requests", "gateway.requests", "Requests that ended, by priority and outcome")
ERRORS = Count("errors_by_kind", "gateway_errors", "gateway.errors", "Rejected, cancelled and failed requests by kind")
ADMITTED = Count("admitted", "gateway_admitted", "gateway.admitted", "Requests that got a replica slot")
PREEMPTIONS = Count(
    "preempted", "gateway_preemptions", "gateway.preemptions", "Times a request gave up its slot before its first byte"
)
RETRIES = Count(
    "retried", "gateway_retries", "gateway.retries", "Requests sent again after a replica failed before the first byte"
)


@dataclass(frozen=True)
class Gauge:
    """A figure of Admission's live state (`/v1/stats`'s `router` part), read at each scrape."""

    state_key: str
    prometheus: str
    help: str
    counter: bool = False  # a running count, published as a counter
    scale: float = 1.0  # from the state's unit to the metric's


# Per priority: `{state_key}_{high|medium|low}` in the state.
STATE_PER_PRIORITY = (
    Gauge("queued", "gateway_queued_requests", "Requests waiting in the gateway's queue now"),
    Gauge("preempt_asks", "gateway_preempt_asks", "Asks to give up a slot for a waiting high request", True),
    Gauge("shed_at_arrival", "gateway_shed_at_arrival", "Requests refused at arrival for their predicted wait", True),
)
STATE = (
    Gauge("in_flight", "gateway_in_flight_requests", "Requests holding a replica slot now"),
    Gauge("concurrency_limit", "gateway_concurrency_limit", "Slots the replicas' limits allow now, all replicas"),
    Gauge("capacity", "gateway_capacity", "Slots of the replicas that serve, at their max_ongoing_requests"),
    Gauge("replicas", "gateway_replicas", "LLM replicas that take requests"),
    Gauge("replicas_draining", "gateway_replicas_draining", "LLM replicas finishing their requests before they stop"),
    Gauge("drain_rate_per_s", "gateway_drain_rate_requests_per_second", "Requests per second the slots finish"),
    Gauge(
        "pending_prefill_tokens",
        "gateway_pending_prefill_tokens",
        "Prompt tokens sent to the replicas whose first token has not come back",
    ),
    Gauge("routers_leased", "gateway_routers", "Routers holding a lease at Admission now"),
    Gauge("reclaimed_routers", "gateway_dead_routers", "Routers taken for dead after their lease ran out", True),
    Gauge("reclaimed_slots", "gateway_reclaimed_slots", "Slots freed from Routers taken for dead", True),
    Gauge("reclaimed_queued", "gateway_reclaimed_queued", "Queued requests of Routers taken for dead, dropped", True),
)
# Per replica: each entry of the state's `replica_detail` list, labelled with its engine's host:port.
STATE_PER_REPLICA = (
    Gauge("in_flight", "gateway_replica_in_flight_requests", "Requests holding a slot on this replica now"),
    Gauge("limit", "gateway_replica_concurrency_limit", "This replica's concurrency limit now"),
    Gauge("dispatched", "gateway_replica_dispatched", "Requests sent to this replica", True),
    Gauge(
        "pending_prefill_tokens",
        "gateway_replica_pending_prefill_tokens",
        "Prompt tokens sent to this replica (less those expected cached) whose first token has not come back",
    ),
    Gauge(
        "kv_tokens",
        "gateway_replica_kv_tokens",
        "KV-cache tokens this replica's requests add, by the gateway's count: uncached prompt and expected output",
    ),
    Gauge(
        "prefill_tokens_per_s",
        "gateway_replica_prefill_tokens_per_second",
        "This replica's measured prefill rate, which sets its prefill budget",
    ),
    Gauge(
        "expected_cached_share",
        "gateway_replica_expected_prefix_cached_ratio",
        "Share of the prompt tokens sent here that the prefix index expected cached",
    ),
    Gauge(
        "engine_prefix_cache_hit_rate",
        "gateway_replica_engine_prefix_cache_hit_ratio",
        "vLLM's prefix-cache hits over queries since it started, read from its /metrics",
    ),
    Gauge("engine_waiting", "gateway_replica_engine_waiting_requests", "Requests waiting inside vLLM's scheduler"),
    Gauge(
        "engine_kv_cache_usage",
        "gateway_replica_engine_kv_cache_usage_ratio",
        "vLLM's KV-cache usage, 0 to 1, read from its /metrics",
    ),
)
