"""Benchmark figures, defined as `vllm bench serve` defines them.

- TTFT: from sending the request to the first chunk that carries generated text.
- E2EL: from sending the request to the end of its stream.
- TPOT: per request, (E2EL - TTFT) / (output tokens - 1), for requests with more than one token.
- ITL: the gaps between successive text chunks of a request, pooled over all requests.
- Throughput: successful requests, and their output tokens (from the server's usage), per second
  of the step's wall time. Goodput: successful requests per second that met every SLO given.
- Queue wait: the gateway's own figure for each request (its `X-Queue-Wait-Ms` answer header), only when
  the server sends it (bare vLLM does not).
In open loop, TTFT and E2EL are also measured from the *intended* send time, so a client that
falls behind its schedule cannot hide the wait (coordinated omission); the difference is client lag.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from serve_app.bench.clients import RequestResult
from serve_app.observability.stats import percentile

PERCENTILES = (50, 90, 95, 99)
CLIENT_LAG_BOUND_S = 0.05  # p95 client lag above this flags a run where the client was the bottleneck
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft_ms=500,tpot_ms=50` -> {"ttft_ms": 500.0, "tpot_ms": 50.0}."""
    if not text:
        return {}
    slo = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SLO_KEYS or not value:
            raise ValueError(f"SLO entry {part!r}: use {', '.join(k + '=N' for k in SLO_KEYS)}")
        slo[key] = float(value)
    return slo


def distribution(values: Iterable[float], scale: float = 1000.0) -> dict[str, float | None]:
    """Mean and percentiles, in milliseconds by default."""
    ordered = sorted(v * scale for v in values)
    out: dict[str, float | None] = {"mean": sum(ordered) / len(ordered) if ordered else None}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(ordered, p)
    return out


def output_tokens(result: RequestResult) -> int:
    """The server's usage count; the number of text chunks only if the server sent no usage."""
    return result.output_tokens if result.output_tokens is not None else len(result.chunk_times)


def ttft(result: RequestResult) -> float | None:
    return None if result.first_token_at is None else result.first_token_at - result.sent_at


def e2el(result: RequestResult) -> float:
    return result.end_at - result.sent_at


def tpot(result: RequestResult) -> float | None:
    first, tokens = ttft(result), output_tokens(result)
    if first is None or tokens < 2:
        return None
    return (e2el(result) - first) / (tokens - 1)


def itls(result: RequestResult) -> list[float]:
    times = result.chunk_times
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def meets_slo(result: RequestResult, slo: dict[str, float]) -> bool:
    checks = {"ttft_ms": ttft(result), "tpot_ms": tpot(result), "e2el_ms": e2el(result)}
    return all(checks[k] is not None and checks[k] * 1000 <= limit for k, limit in slo.items())


def summarize(
    results: Sequence[RequestResult], duration_s: float, slo: dict[str, float], by_priority: bool = True
) -> dict[str, Any]:
    ok = [r for r in results if r.outcome == "ok"]
    open_loop = any(r.intended_at is not None for r in results)
    outcomes = Counter(r.outcome for r in results)
    errors = Counter((r.error or "").split(":", 1)[0] for r in results if r.outcome != "ok")
    summary: dict[str, Any] = {
        "requests": len(results),
        "completed": len(ok),
        "outcomes": {k: outcomes.get(k, 0) for k in ("ok", "rate_limited", "timeout", "error")},
        "errors_by_kind": dict(errors),
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_token_throughput": sum(output_tokens(r) for r in ok) / duration_s if duration_s else 0.0,
        "total_output_tokens": sum(output_tokens(r) for r in ok),
        "ttft_ms": distribution(v for r in ok if (v := ttft(r)) is not None),
        "tpot_ms": distribution(v for r in ok if (v := tpot(r)) is not None),
        "itl_ms": distribution(v for r in ok for v in itls(r)),
        "e2el_ms": distribution(e2el(r) for r in ok),
    }
    waits = [r.queue_wait_ms for r in results if r.queue_wait_ms is not None]
    if waits:
        summary["queue_wait_ms"] = distribution(waits, scale=1.0)
    refused = [r for r in results if r.outcome == "rate_limited"]
    summary["rejections"] = {
        "count": len(refused),
        "with_retry_after": sum(1 for r in refused if (r.retry_after or "").isdigit()),
        "latency_ms": distribution(r.end_at - r.sent_at for r in refused),
    }
    if slo:
        good = sum(1 for r in ok if meets_slo(r, slo))
        summary["slo"] = slo
        summary["goodput"] = good / duration_s if duration_s else 0.0
        summary["slo_attainment"] = good / len(results) if results else 0.0
    if open_loop:
        lags = [r.sent_at - r.intended_at for r in results if r.intended_at is not None]
        lag = distribution(lags)
        summary["client_lag_ms"] = {**lag, "max": max(lags) * 1000}
        summary["client_bound"] = (lag["p95"] or 0.0) > CLIENT_LAG_BOUND_S * 1000
        summary["ttft_from_intended_ms"] = distribution(
            r.first_token_at - r.intended_at for r in ok if r.first_token_at is not None and r.intended_at is not None
        )
        summary["e2el_from_intended_ms"] = distribution(
            r.end_at - r.intended_at for r in ok if r.intended_at is not None
        )
    priorities = sorted({r.priority for r in results if r.priority})
    if by_priority and priorities:
        summary["per_priority"] = {
            p: summarize([r for r in results if r.priority == p], duration_s, slo, by_priority=False)
            for p in priorities
        }
    return summary


# ---- the engines' prefix cache, from vLLM's own Prometheus counters ------------------------------------------

# vLLM's counters, in tokens; the first name is today's, the second what older vLLM called it.
PREFIX_CACHE_COUNTERS = {
    "hits": ("vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits"),
    "queries": ("vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries"),
}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def parse_prefix_cache(text: str) -> dict[str, float | None]:
    """{"hits": tokens, "queries": tokens} from a vLLM /metrics text, each summed over its label sets (engines,
    models); None where the counter is absent. Today's name wins where an engine exposes both."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if sample.name.endswith(("_created", "_bucket")):
                continue
            sums[name] = sums.get(name, 0.0) + sample.value
    out: dict[str, float | None] = {}
    for key, names in PREFIX_CACHE_COUNTERS.items():
        out[key] = next((sums[n] for n in names if n in sums), None)
    return out


Get = Callable[..., Any]  # httpx.get, or a stand-in in tests


def engine_urls(spec: str | None, server_url: str, get: Get | None = None) -> list[str]:
    """`--engine-metrics`: a comma list of vLLM base URLs, or `auto`: the gateway's /metrics/targets (Prometheus
    HTTP-SD JSON), or else the server itself (bare vLLM)."""
    if not spec:
        return []
    if spec != "auto":
        return [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]
    if get is None:
        import httpx

        get = httpx.get
    server_url = server_url.rstrip("/")
    try:
        response = get(f"{server_url}/metrics/targets", timeout=10)
        if response.status_code == 200:
            found = [t for group in response.json() for t in group.get("targets", [])]
            if not found:
                _warn(f"{server_url}/metrics/targets lists no engines: no prefix-cache figures")
            return [t if "://" in t else f"http://{t}" for t in found]
    except Exception as exc:  # a scrape never ends the run
        _warn(f"{server_url}/metrics/targets: {type(exc).__name__}: {exc}; reading {server_url}/metrics instead")
    return [server_url]


def scrape_prefix_cache(engines: Sequence[str], get: Get | None = None) -> dict[str, dict[str, float | None] | None]:
    """Each engine's counters now; None for an engine that could not be read (with a warning)."""
    if get is None:
        import httpx

        get = httpx.get
    out: dict[str, dict[str, float | None] | None] = {}
    for url in engines:
        try:
            response = get(f"{url}/metrics", timeout=10)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")
            out[url] = parse_prefix_cache(response.text)
            if out[url]["queries"] is None:
                _warn(f"{url}/metrics has no vllm:prefix_cache_queries (is vLLM's --disable-log-stats on?)")
        except Exception as exc:
            _warn(f"could not read {url}/metrics: {type(exc).__name__}: {exc}")
            out[url] = None
    return out


def _rate(hits: float | None, queries: float | None) -> float | None:
    return hits / queries if hits is not None and queries else None


def prefix_cache_delta(
    before: dict[str, dict[str, float | None] | None], after: dict[str, dict[str, float | None] | None]
) -> dict[str, Any]:
    """Hits and queries (tokens) during the run, per engine and in total, and hit rate = hits / queries (None
    without queries). An engine read only once, without the counters, or whose counters went back (a restart)
    has None figures and is left out of the total."""
    engines: dict[str, dict[str, float | None]] = {}
    for url in before.keys() | after.keys():
        a, b = before.get(url), after.get(url)
        row: dict[str, float | None] = {"hits": None, "queries": None, "hit_rate": None}
        if a and b and None not in (a["hits"], a["queries"], b["hits"], b["queries"]):
            hits, queries = b["hits"] - a["hits"], b["queries"] - a["queries"]  # type: ignore[operator]
            if hits >= 0 and queries >= 0:
                row = {"hits": hits, "queries": queries, "hit_rate": _rate(hits, queries)}
        engines[url] = row
    counted = [r for r in engines.values() if r["queries"] is not None]
    hits = sum(r["hits"] or 0.0 for r in counted) if counted else None
    queries = sum(r["queries"] or 0.0 for r in counted) if counted else None
    return {
        "engines": dict(sorted(engines.items())),
        "hits": hits,
        "queries": queries,
        "hit_rate": _rate(hits, queries),
    }


def prefix_cache_line(figures: dict[str, Any]) -> str:
    engines = len(figures["engines"])
    read = sum(1 for r in figures["engines"].values() if r["queries"] is not None)
    if figures["queries"] is None:
        return f"prefix cache: no figures ({read}/{engines} engines read)"
    rate = figures["hit_rate"]
    shown = f"{100 * rate:.1f}%" if rate is not None else "-"
    return (
        f"prefix cache: {shown} hit rate ({figures['hits']:.0f}/{figures['queries']:.0f} tokens, "
        f"{read}/{engines} engines read)"
    )
