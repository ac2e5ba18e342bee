from conftest import metric_samples, sample

from serve_app.observability import catalog
from serve_app.observability.stats import GatewayStats, RequestRecord, percentile


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_counts_and_histograms_per_priority():
    stats = GatewayStats()
    stats.add_many(
        [
            RequestRecord(
                "high", "completed", admitted=True, queue_wait_s=0.0, ttft_s=0.1, e2e_s=0.5, output_tokens=10
            ),
            RequestRecord(
                "high", "completed", admitted=True, queue_wait_s=0.2, ttft_s=0.3, e2e_s=1.5, output_tokens=30
            ),
            RequestRecord("low", "rejected", kind="queue_full").to_dict(),
            RequestRecord("low", "cancelled", kind="client_gone", admitted=True, queue_wait_s=1.0, e2e_s=2.0),
            RequestRecord("medium", "completed", admitted=True, retried=True, preemptions=2).to_dict(),
        ]
    )
    summary = stats.summary()["priorities"]
    assert summary["high"]["completed"] == 2 and summary["high"]["admitted"] == 2
    assert summary["high"]["e2e_latency_seconds"]["p50"] == 1.0
    assert summary["high"]["output_tokens"]["mean"] == 20
    assert summary["low"]["rejected"] == 1 and summary["low"]["cancelled"] == 1
    assert summary["low"]["errors_by_kind"] == {"rejected:queue_full": 1, "cancelled:client_gone": 1}
    assert summary["low"]["e2e_latency_seconds"]["count"] == 0, "only completed requests count in e2e latency"
    assert summary["medium"]["retried"] == 1 and summary["medium"]["preempted"] == 2
    assert summary["high"]["retried"] == 0
    samples = metric_samples(stats.prometheus())
    assert sample(samples, "gateway_retries_total", priority="medium") == 1
    assert sample(samples, "gateway_preemptions_total", priority="medium") == 2
    assert sample(samples, "gateway_requests_total", priority="high", outcome="completed") == 2
    assert sample(samples, "gateway_e2e_latency_seconds_bucket", priority="high", le="1.0") == 1
    assert sample(samples, "gateway_e2e_latency_seconds_bucket", priority="high", le="+Inf") == 2
    assert sample(samples, "gateway_e2e_latency_seconds_count", priority="low") == 0
    assert sample(samples, "gateway_errors_total", priority="low", outcome="rejected", kind="queue_full") == 1


STATE = {
    "queued_high": 1,
    "queued_medium": 0,
    "queued_low": 2,
    "in_flight": 3,
    "capacity": 8,
    "pending_prefill_tokens": 6000,
    "shed_at_arrival_low": 4,
    "replica_detail": [
        {
            "replica": "10.0.0.5:41000",
            "in_flight": 3,
            "limit": 5,
            "dispatched": 9,
            "draining": False,
            "pending_prefill_tokens": 6000,
            "kv_tokens": 7000,
            "prefill_tokens_per_s": 50_000.0,
            "expected_cached_share": 0.5,
            "engine_prefix_cache_hit_rate": 0.45,
            "engine_waiting": None,  # not read from the engine yet
            "engine_kv_cache_usage": 0.1,
        }
    ],
}


def test_admissions_state_is_published_with_units_in_the_names():
    samples = metric_samples(GatewayStats().prometheus(STATE))
    assert sample(samples, "gateway_queued_requests", priority="low") == 2
    assert sample(samples, "gateway_in_flight_requests") == 3 and sample(samples, "gateway_capacity") == 8
    assert sample(samples, "gateway_pending_prefill_tokens") == 6000
    assert sample(samples, "gateway_shed_at_arrival_total", priority="low") == 4
    assert sample(samples, "gateway_shed_at_arrival_total", priority="high") == 0
    assert sample(samples, "gateway_replica_dispatched_total", replica="10.0.0.5:41000") == 9
    assert sample(samples, "gateway_replica_in_flight_requests", replica="10.0.0.5:41000") == 3
    assert sample(samples, "gateway_replica_engine_prefix_cache_hit_ratio", replica="10.0.0.5:41000") == 0.45
    assert sample(samples, "gateway_replica_prefill_tokens_per_second", replica="10.0.0.5:41000") == 50_000
    assert sample(samples, "gateway_replica_engine_waiting_requests", replica="10.0.0.5:41000") is None, (
        "a figure not read yet is left out, not published as 0"
    )


def test_label_values_from_upstream_are_escaped_by_the_library():
    stats = GatewayStats()
    stats.add_many([RequestRecord("low", "error", kind="bad_request")])
    stats.classes["low"].errors['error:odd "kind"\\n'] += 1  # as if a kind carried quotes and a backslash
    samples = metric_samples(stats.prometheus())
    assert sample(samples, "gateway_errors_total", priority="low", outcome="error", kind='odd "kind"\\n') == 1


def test_every_figure_is_recorded_alike_on_both_sides():
    """One catalog: OpenTelemetry counts e2e latency and tokens for completed requests only, as Prometheus does."""
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from serve_app.observability.otel import OtelBridge

    records = [
        RequestRecord("low", "rejected", kind="queue_full", e2e_s=0.001, queue_wait_s=0.0),
        RequestRecord("low", "completed", admitted=True, queue_wait_s=0.1, ttft_s=0.2, e2e_s=0.4, output_tokens=9),
    ]
    reader = InMemoryMetricReader()
    bridge = OtelBridge("console", reader=reader)
    stats = GatewayStats()
    for record in records:
        bridge.record(record)
    stats.add_many(records)
    otel = {
        m.name: sum(p.count for p in m.data.data_points)
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if hasattr(m.data.data_points[0], "count")
    }
    samples = metric_samples(stats.prometheus())
    for figure in catalog.DISTRIBUTIONS:
        assert otel.get(figure.otel, 0) == sample(samples, f"{figure.prometheus}_count", priority="low"), figure
    bridge.shutdown()


def test_opentelemetry_mirror_records_per_priority():
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from serve_app.observability.otel import OtelBridge

    reader = InMemoryMetricReader()
    bridge = OtelBridge("console", reader=reader)
    bridge.record(RequestRecord("high", "completed", admitted=True, queue_wait_s=0.0, ttft_s=0.1, e2e_s=0.4))
    bridge.record(RequestRecord("low", "rejected", kind="queue_full"))
    metrics = {
        m.name: m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    counts = {
        (p.attributes["priority"], p.attributes["outcome"]): p.value
        for p in metrics["gateway.requests"].data.data_points
    }
    assert counts == {("high", "completed"): 1, ("low", "rejected"): 1}
    (point,) = metrics["gateway.e2e_latency"].data.data_points
    assert point.count == 1 and point.sum == 0.4
    bridge.shutdown()


async def test_the_metric_names_in_the_readme_and_docs_are_the_ones_served():
    """Every `gateway_*` name the README and docs/dashboard.md give is a family of /metrics, and every family of
    /metrics is in the README's table; the state comes from a real Admission actor with a replica."""
    import pathlib
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from serve_app.config import QueueConfig
    from serve_app.deployments.admission import AdmissionActor

    actor = AdmissionActor(QueueConfig(), replica_check_s=3600)
    await actor.register_replica("r1", "http://127.0.0.1:9", 4)
    try:
        text = GatewayStats().prometheus(await actor.state())
    finally:
        actor._checker.cancel()
    served = set()
    for family in text_string_to_metric_families(text):
        suffix = "_total" if family.type == "counter" else ""
        served.add(family.name + suffix)
    root = pathlib.Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    table = readme[readme.index("### Metrics") : readme.index("### The dashboard")]
    in_table = set(re.findall(r"`(gateway_[a-z0-9_]+)`", table))
    assert in_table == served
    for doc in ("README.md", "docs/dashboard.md"):
        named = set(re.findall(r"\b(gateway_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b", (root / doc).read_text()))
        assert named <= served, (doc, named - served)
