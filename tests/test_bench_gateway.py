"""One `--quick` benchmark run against the real gateway."""

from __future__ import annotations

import json

import pytest
from conftest import stats, wait_for

from serve_app.bench.cli import main

pytestmark = pytest.mark.engine


def test_quick_run_against_the_gateway(gateway, tmp_path):
    before = stats(gateway)["priorities"]
    code = main(["--url", gateway, "--quick", "--priority-mix", "high:0.5,medium:0.5", "--out", str(tmp_path)])
    assert code == 0
    run = json.loads((tmp_path / "results.json").read_text())
    assert {(s["mode"], s["value"]) for s in run["steps"]} == {(m, c) for m in ("sync", "async") for c in (1, 4, 8)}
    sent = 0
    for step in run["steps"]:
        summary = step["summary"]
        assert summary["outcomes"]["ok"] == summary["requests"], step["name"]
        assert 0 < summary["total_output_tokens"] <= 32 * summary["requests"]
        assert summary["ttft_ms"]["p50"] > 0 and summary["output_token_throughput"] > 0
        sent += summary["requests"]

    def served() -> int:  # each Router flushes its records every metrics_flush_s
        after = stats(gateway)["priorities"]
        return sum(after[p]["completed"] - before[p]["completed"] for p in ("high", "medium"))

    assert wait_for(lambda: served() >= sent, timeout_s=60), "the gateway's own counters saw every benchmark request"
    after = stats(gateway)["priorities"]
    cancelled = sum(after[p]["cancelled"] - before[p]["cancelled"] for p in ("high", "medium"))
    assert cancelled == 0, "a client that hangs up right after [DONE] still got a complete answer"
    assert (tmp_path / "report.md").exists() and len(list(tmp_path.glob("*.png"))) == 4
