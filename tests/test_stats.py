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
    text = stats.prometheus()
    assert 'gateway_retried_total{priority="medium"} 1' in text
    assert 'gateway_requests_total{priority="high",outcome="completed"} 2' in text
    assert 'gateway_e2e_latency_seconds_bucket{priority="high",le="1.0"} 1' in text
    assert 'gateway_e2e_latency_seconds_bucket{priority="high",le="+Inf"} 2' in text
    assert 'gateway_errors_total{priority="low",outcome="rejected",kind="queue_full"} 1' in text


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
