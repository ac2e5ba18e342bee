"""The Grafana dashboard (dashboards/gateway.json): every panel's PromQL answers with series from a real Prometheus.

Prometheus is a real binary, started here on a free port with a temporary config and storage and always stopped:
PROMETHEUS_BIN, else the one scripts/install.sh unpacks into the venv (scripts/prometheus_for_tests.sh), else
`prometheus` on PATH. Without one the Prometheus tests fail (never skip), saying how to install it.

- test_dashboard_model: the JSON model's shape, and that it names only known metrics (no Prometheus).
- test_vllm_metric_names_are_declared_by_the_installed_vllm: vLLM's names, read from its source (no Prometheus).
- test_gateway_panels_against_an_exporter_of_the_contract_names: Prometheus scrapes an in-process exporter of the
  gateway's metric names and finds a stand-in engine through the same HTTP service discovery as in production;
  every panel on gateway_* names must answer. The start/scrape/query/stop path, without the engine.
- test_every_panel_answers_from_the_real_gateway (engine): Prometheus scrapes the session's real gateway and,
  found through its /metrics/targets, the vLLM server of its replica, under a mixed load; every panel must answer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from conftest import MODEL_ID, free_port

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards" / "gateway.json"

PROMETHEUS_READY_S = 120  # generous waits: the machine may be busy with engines
SERIES_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 600

# Grafana's interval variables, as a query at one instant needs them; any other `$` in an expression is an error.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}
GRAFANA_INTERVAL = re.compile(r"\$(?:\{(__rate_interval|__interval|__range)\}|(__rate_interval|__interval|__range)\b)")

PRIORITIES = ("high", "medium", "low")
OUTCOMES = ("completed", "rejected", "cancelled", "error")

# The gateway's /metrics (the contract the dashboard is written against): name -> (type, labels).
GATEWAY_METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway_requests": ("counter", ("priority", "outcome")),
    "gateway_admitted": ("counter", ("priority",)),
    "gateway_preemptions": ("counter", ("priority",)),
    "gateway_retries": ("counter", ("priority",)),
    "gateway_errors": ("counter", ("priority", "outcome", "kind")),
    "gateway_preempt_asks": ("counter", ("priority",)),
    "gateway_shed_at_arrival": ("counter", ("priority",)),
    "gateway_replica_dispatched": ("counter", ("replica",)),
    "gateway_queue_wait_seconds": ("histogram", ("priority",)),
    "gateway_time_to_first_token_seconds": ("histogram", ("priority",)),
    "gateway_e2e_latency_seconds": ("histogram", ("priority",)),
    "gateway_output_tokens": ("histogram", ("priority",)),
    "gateway_queued_requests": ("gauge", ("priority",)),
    "gateway_in_flight_requests": ("gauge", ()),
    "gateway_concurrency_limit": ("gauge", ()),
    "gateway_capacity": ("gauge", ()),
    "gateway_replicas": ("gauge", ()),
    "gateway_replicas_draining": ("gauge", ()),
    "gateway_drain_rate_requests_per_second": ("gauge", ()),
    "gateway_pending_prefill_tokens": ("gauge", ()),
    "gateway_replica_in_flight_requests": ("gauge", ("replica",)),
    "gateway_replica_concurrency_limit": ("gauge", ("replica",)),
    "gateway_replica_pending_prefill_tokens": ("gauge", ("replica",)),
    "gateway_replica_kv_tokens": ("gauge", ("replica",)),
    "gateway_replica_prefill_tokens_per_second": ("gauge", ("replica",)),
    "gateway_replica_expected_prefix_cached_ratio": ("gauge", ("replica",)),
    "gateway_replica_engine_prefix_cache_hit_ratio": ("gauge", ("replica",)),
    "gateway_replica_engine_waiting_requests": ("gauge", ("replica",)),
    "gateway_replica_engine_kv_cache_usage_ratio": ("gauge", ("replica",)),
}
# vLLM's engine metrics the dashboard may use: long-standing names that vLLM registers unconditionally (on CPU too).
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
METRIC_NAME = re.compile(r"\b(?:gateway_|vllm:)[a-zA-Z0-9_:]*")


def exposed_names(metrics: dict[str, str]) -> dict[str, str]:
    """The series names each metric is exposed as -> the metric."""
    return {name + suffix: name for name, kind in metrics.items() for suffix in SUFFIXES[kind]}


KNOWN_SERIES = exposed_names({name: kind for name, (kind, _) in GATEWAY_METRICS.items()} | VLLM_METRICS)


# ---- the dashboard ---------------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def for_instant_query(expr: str) -> str:
    return GRAFANA_INTERVAL.sub(lambda m: GRAFANA_INTERVALS[m.group(1) or m.group(2)], expr)


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every panel, Grafana's interval variables substituted."""
    return [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", for_instant_query(target["expr"]))
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


# ---- Prometheus ------------------------------------------------------------------------------------------


def find_prometheus() -> str:
    """The Prometheus binary to run, or a failure that says how to get one."""
    wanted = os.environ.get("PROMETHEUS_BIN")
    if wanted:
        if not (os.path.isfile(wanted) and os.access(wanted, os.X_OK)):
            pytest.fail(f"PROMETHEUS_BIN={wanted} is not an executable file", pytrace=False)
        return wanted
    unpacked = [Path(sys.prefix) / "prometheus/usr/bin/prometheus", REPO / ".venv/prometheus/usr/bin/prometheus"]
    for candidate in unpacked:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    on_path = shutil.which("prometheus")
    if on_path:
        return on_path
    pytest.fail(
        "no Prometheus binary: looked for PROMETHEUS_BIN, "
        + ", ".join(str(c) for c in unpacked)
        + " and `prometheus` on PATH. Install one with `bash scripts/install.sh` (or just "
        "`bash scripts/prometheus_for_tests.sh`, which unpacks Debian's package into .venv/prometheus without "
        "installing a service), or `apt-get install prometheus`, or set PROMETHEUS_BIN.",
        pytrace=False,
    )


def scrape_config(gateway: str, targets_url: str) -> dict[str, Any]:
    """The two jobs of docs/dashboard.md, every second."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "gateway", "static_configs": [{"targets": [gateway]}]},
            {"job_name": "vllm", "http_sd_configs": [{"url": targets_url, "refresh_interval": "1s"}]},
        ],
    }


class Prometheus:
    """One Prometheus process on a free 127.0.0.1 port, with its config and storage under `workdir`."""

    def __init__(self, binary: str, config: dict[str, Any], workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Prometheus:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a Ctrl-C of pytest reaches it only through stop()
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + PROMETHEUS_READY_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"Prometheus exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Prometheus was not ready within {PROMETHEUS_READY_S}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s; it is waited for either way."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series an instant query answers; raises ValueError with Prometheus's message on a bad query."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def unanswered(self, queries: list[tuple[str, str]]) -> list[str]:
        """'where: expr (why)' for each query that answers no series, or fails."""
        missing = []
        for where, expr in queries:
            try:
                if not self.query(expr):
                    missing.append(f"{where}: {expr}  (no series)")
            except (ValueError, httpx.HTTPError) as exc:
                missing.append(f"{where}: {expr}  ({exc})")
        return missing

    def wait_until_answered(self, queries: list[tuple[str, str]], timeout_s: float) -> list[str]:
        """Polls until every query answers series; past `timeout_s`, the ones that still do not."""
        deadline = time.monotonic() + timeout_s
        while True:
            missing = self.unanswered(queries)
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(1)

    def targets(self) -> str:
        """The scrape targets' health, for a failure's message."""
        try:
            data = httpx.get(f"{self.url}/api/v1/targets", timeout=30).json()["data"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"(targets unreadable: {exc})"
        active = data.get("activeTargets", [])
        lines = [
            f"  {t['labels'].get('job')} {t['scrapeUrl']}: {t['health']} {t.get('lastError') or ''}".rstrip()
            for t in active
        ]
        jobs = {t["labels"].get("job") for t in active}
        lines += [f"  {job}: no target" for job in ("gateway", "vllm") if job not in jobs]
        return "\n".join(lines)


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    """Session-scoped and named before `gateway`: without Prometheus, fail before the engines start."""
    return find_prometheus()


def failure_report(missing: list[str], prometheus: Prometheus) -> str:
    return (
        f"{len(missing)} panel expression(s) answered no series:\n"
        + "\n".join(f"  {line}" for line in missing)
        + f"\nscrape targets:\n{prometheus.targets()}\nPrometheus's log (tail):\n{prometheus.log_tail()}"
    )


# ---- without Prometheus ----------------------------------------------------------------------------------


def test_dashboard_model():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        where = f"panel {panel['id']} {panel['title']!r}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, where
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            expr = for_instant_query(target["expr"])
            assert "$" not in expr, f"{where}: a Grafana variable the tests cannot substitute: {target['expr']}"
            unknown = metric_names(expr) - set(KNOWN_SERIES)
            assert not unknown, f"{where}: series that are neither the gateway's nor known vLLM ones: {unknown}"
    used = {KNOWN_SERIES[name] for _, expr in panel_queries(dashboard) for name in metric_names(expr)}
    assert set(GATEWAY_METRICS) <= used, f"gateway metrics on no panel: {set(GATEWAY_METRICS) - used}"


def test_vllm_metric_names_are_declared_by_the_installed_vllm():
    """Every vLLM metric the dashboard uses is declared in the installed vLLM's metrics code (vllm/v1/metrics)."""
    spec = importlib.util.find_spec("vllm")  # finds, does not import
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    metrics_dir = Path(next(iter(spec.submodule_search_locations))) / "v1" / "metrics"
    declared = set()
    for source in metrics_dir.glob("*.py"):
        declared |= set(re.findall(r"""["'](vllm:[a-z0-9_:]+)["']""", source.read_text()))
    assert declared, f"no vllm:* metric names found in {metrics_dir}: has vLLM moved its metrics?"
    used = {KNOWN_SERIES.get(name, name) for _, expr in panel_queries(load_dashboard()) for name in metric_names(expr)}
    used_vllm = {name for name in used if name.startswith("vllm:")}
    assert used_vllm, "the dashboard shows no vLLM metric"
    assert used_vllm <= declared, f"not declared by the installed vLLM: {sorted(used_vllm - declared)}"


# ---- Prometheus against an exporter of the contract names --------------------------------------------------


def contract_exposition(replica: str) -> bytes:
    """The gateway's metric names and labels with every per-priority series present (as the gateway's are from
    its start), one replica, and one error kind (kinds appear only once they happen)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    registry = CollectorRegistry()
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    for name, (kind, labels) in GATEWAY_METRICS.items():
        metric = kinds[kind](name, f"{name} (test exporter)", labels, registry=registry)
        if "kind" in labels:
            metric.labels(priority="low", outcome="error", kind="not_found").inc()
        elif "outcome" in labels:
            for priority in PRIORITIES:
                for outcome in OUTCOMES:
                    metric.labels(priority=priority, outcome=outcome)
        elif "priority" in labels:
            for priority in PRIORITIES:
                metric.labels(priority=priority)
        elif "replica" in labels:
            metric.labels(replica=replica)
    return generate_latest(registry)


class Exporter:
    """An HTTP server on a free 127.0.0.1 port answering GET path -> (content type, body) in a thread."""

    def __init__(self, routes: dict[str, tuple[str, bytes]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path not in routes:
                    self.send_error(404)
                    return
                content_type, payload = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def test_gateway_panels_against_an_exporter_of_the_contract_names(prometheus_bin, tmp_path):
    """Every panel expression on gateway_* names only answers from the contract's names; the `vllm` job finds its
    target through HTTP service discovery. The vLLM panels are left to the engine test: a stand-in engine here
    would only answer with the names this file gives it."""
    text = "text/plain; version=0.0.4; charset=utf-8"
    with Exporter({"/metrics": (text, b'vllm:num_requests_running{engine="0"} 0\n')}) as engine:
        targets = json.dumps([{"targets": [engine.address], "labels": {}}]).encode()
        gateway_routes = {
            "/metrics": (text, contract_exposition(engine.address)),
            "/metrics/targets": ("application/json", targets),
        }
        with Exporter(gateway_routes) as gateway:
            config = scrape_config(gateway.address, f"http://{gateway.address}/metrics/targets")
            with Prometheus(prometheus_bin, config, tmp_path) as prometheus:
                gateway_only = [
                    (where, expr)
                    for where, expr in panel_queries(load_dashboard())
                    if not any(name.startswith("vllm:") for name in metric_names(expr))
                ]
                discovery = [
                    ("the gateway job", 'up{job="gateway"} == 1'),
                    ("the engine found through /metrics/targets", f'up{{job="vllm",instance="{engine.address}"}} == 1'),
                ]
                missing = prometheus.wait_until_answered(discovery + gateway_only, timeout_s=SERIES_TIMEOUT_S)
                assert not missing, failure_report(missing, prometheus)
            assert prometheus.process.poll() is not None, "Prometheus is still running"


# ---- Prometheus against the real gateway -------------------------------------------------------------------


async def mixed_load(base_url: str) -> dict[str, list[int]]:
    """High, medium and low requests at once (half of them streaming) on a gateway of one slot, so most wait in
    the queue; a stream its client drops after the first token; a request for an unknown model (404)."""

    def body(n: int, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
        return {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": f"Name {n} colours."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }

    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as http:

        async def one(priority: str, n: int) -> tuple[str, int]:
            headers = {"X-Priority": priority}
            if n % 2:
                async with http.stream("POST", "/v1/chat/completions", json=body(n, True), headers=headers) as r:
                    async for _ in r.aiter_lines():
                        pass
                return priority, r.status_code
            r = await http.post("/v1/chat/completions", json=body(n, False), headers=headers)
            return priority, r.status_code

        async def dropped() -> tuple[str, int]:
            long = {**body(0, True, max_tokens=400), "ignore_eos": True}
            async with http.stream("POST", "/v1/chat/completions", json=long, headers={"X-Priority": "medium"}) as r:
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break  # leaving the block closes the connection mid-stream
            return "dropped", r.status_code

        async def unknown_model() -> tuple[str, int]:
            r = await http.post("/v1/chat/completions", json={**body(0, False), "model": "no-such-model"})
            return "unknown model", r.status_code

        calls = [one(priority, n) for n in range(4) for priority in PRIORITIES]
        results = await asyncio.gather(*calls, dropped(), unknown_model())
    statuses: dict[str, list[int]] = {}
    for what, status in results:
        statuses.setdefault(what, []).append(status)
    return statuses


@pytest.mark.engine
async def test_every_panel_answers_from_the_real_gateway(prometheus_bin, gateway, tmp_path):
    address = urlsplit(gateway).netloc
    config = scrape_config(address, f"{gateway}/metrics/targets")
    with Prometheus(prometheus_bin, config, tmp_path) as prometheus:
        jobs_up = [(job, f'up{{job="{job}"}} == 1') for job in ("gateway", "vllm")]
        # Scraping before the load too, so that rates see the counters rise. Not fatal here: the report below
        # shows the targets' health.
        await asyncio.to_thread(prometheus.wait_until_answered, jobs_up, PROMETHEUS_READY_S)
        statuses = await mixed_load(gateway)
        assert statuses["unknown model"] == [404], statuses
        assert any(status == 200 for priority in PRIORITIES for status in statuses[priority]), statuses
        # A few scrapes of every target after the load (up's timestamp is its last scrape's), then every panel.
        after_load = [("every target scraped 3 s after the load", f"min(timestamp(up)) > {time.time() + 3:.3f}")]
        await asyncio.to_thread(prometheus.wait_until_answered, after_load, PROMETHEUS_READY_S)
        queries = jobs_up + panel_queries(load_dashboard())
        missing = await asyncio.to_thread(prometheus.wait_until_answered, queries, SERIES_TIMEOUT_S)
        assert not missing, failure_report(missing, prometheus)
    assert prometheus.process.poll() is not None, "Prometheus is still running"
