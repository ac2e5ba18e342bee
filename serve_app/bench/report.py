"""A run folder: results.json, requests.jsonl, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve_app.bench.clients import RequestResult
from serve_app.bench.metrics import ttft

RATIO_METRICS = (
    ("request_throughput", None),
    ("output_token_throughput", None),
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "p50"),
    ("itl_ms", "p50"),
    ("e2el_ms", "p50"),
    ("e2el_ms", "p99"),
)


def write_requests(path: Path, step: dict[str, Any], results: list[RequestResult]) -> None:
    with path.open("a") as out:
        for result in results:
            out.write(json.dumps({"step": step["name"], "server": step["server"], **result.to_dict()}) + "\n")


def metric(summary: dict[str, Any], name: str, stat: str | None) -> float | None:
    value = summary.get(name)
    return value.get(stat) if stat and isinstance(value, dict) else value


def ratios(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """B / A for each step run against both servers (same mode and load)."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for step in steps:
        by_key.setdefault((step["mode"], step["load"], step["value"]), {})[step["server"]] = step["summary"]
    rows = []
    for (mode, load, value), servers in by_key.items():
        if {"A", "B"} <= servers.keys():
            row: dict[str, Any] = {"mode": mode, "load": load, "value": value}
            for name, stat in RATIO_METRICS:
                a, b = metric(servers["A"], name, stat), metric(servers["B"], name, stat)
                row[f"{name}{'_' + stat if stat else ''}"] = b / a if a and b is not None else None
            rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(run: dict[str, Any]) -> str:
    lines = [f"# Benchmark run {run['started']}", ""]
    servers = ", ".join(f"{k} = {v}" for k, v in run["servers"].items())
    lines += [f"Servers: {servers}. Model: `{run['model']}`. Command: `{run['command']}`", ""]
    lines += [
        "| server | mode | load | ok | 429 | timeout | error | req/s | out tok/s | TTFT p50 | TTFT p99 "
        "| TPOT p50 | ITL p50 | E2EL p50 | E2EL p99 | client lag p95 | client CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in run["steps"]:
        s = step["summary"]
        o = s["outcomes"]
        lag = s.get("client_lag_ms", {}).get("p95")
        flag = " (client-bound)" if s.get("client_bound") else ""
        lines.append(
            f"| {step['server']} | {step['mode']} | {step['load']}={step['value']} | {o['ok']} | {o['rate_limited']} "
            f"| {o['timeout']} | {o['error']} | {_fmt(s['request_throughput'], 2)} "
            f"| {_fmt(s['output_token_throughput'])} | {_fmt(s['ttft_ms']['p50'])} | {_fmt(s['ttft_ms']['p99'])} "
            f"| {_fmt(s['tpot_ms']['p50'])} | {_fmt(s['itl_ms']['p50'])} | {_fmt(s['e2el_ms']['p50'])} "
            f"| {_fmt(s['e2el_ms']['p99'])} | {_fmt(lag)}{flag} | {_fmt(s.get('client_cpu_ms_per_request'), 2)} |"
        )
    lines += [
        "",
        "Latencies in ms. TTFT/TPOT/ITL/E2EL as `vllm bench serve` defines them (see docs/benchmarks.md).",
        "",
    ]
    per_priority = [(step, p, s) for step in run["steps"] for p, s in step["summary"].get("per_priority", {}).items()]
    if per_priority:
        lines += [
            "## Per priority",
            "",
            "| server | mode | load | priority | ok | 429 (with Retry-After) | 429 p99 | TTFT p50 | TTFT p99 "
            "| TTFT from schedule p50 | p99 | E2EL p50 | gateway queue wait p99 |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for step, p, s in per_priority:
            refused = s.get("rejections") or {"count": 0, "with_retry_after": 0, "latency_ms": {"p99": None}}
            scheduled = s.get("ttft_from_intended_ms") or {"p50": None, "p99": None}
            lines.append(
                f"| {step['server']} | {step['mode']} | {step['load']}={step['value']} | {p} | {s['outcomes']['ok']} "
                f"| {refused['count']} ({refused['with_retry_after']}) | {_fmt(refused['latency_ms']['p99'])} "
                f"| {_fmt(s['ttft_ms']['p50'])} | {_fmt(s['ttft_ms']['p99'])} "
                f"| {_fmt(scheduled['p50'])} | {_fmt(scheduled['p99'])} | {_fmt(s['e2el_ms']['p50'])} "
                f"| {_fmt((s.get('queue_wait_ms') or {}).get('p99'))} |"
            )
        lines.append("")
    cached = [step for step in run["steps"] if "prefix_cache" in step["summary"]]
    if cached:
        lines += ["## Prefix cache (the engines' own counters, in tokens)", ""]
        lines += ["| server | mode | load | hits | queries | hit rate |", "|---|---|---|---|---|---|"]
        for step in cached:
            c = step["summary"]["prefix_cache"]
            lines.append(
                f"| {step['server']} | {step['mode']} | {step['load']}={step['value']} | {_fmt(c['hits'], 0)} "
                f"| {_fmt(c['queries'], 0)} | {_fmt(c['hit_rate'], 3)} |"
            )
        lines.append("")
    if run.get("ratios"):
        names = [f"{n}{'_' + s if s else ''}" for n, s in RATIO_METRICS]
        lines += ["## B / A ratios", "", "| mode | load | " + " | ".join(names) + " |"]
        lines += ["|---|---|" + "---|" * len(names)]
        for row in run["ratios"]:
            cells = " | ".join(_fmt(row[n], 3) for n in names)
            lines.append(f"| {row['mode']} | {row['load']}={row['value']} | {cells} |")
        lines.append("")
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in run.get("plots", [])]
    return "\n".join(lines) + "\n"


def plot(run: dict[str, Any], results: dict[str, list[RequestResult]], folder: Path) -> list[str]:
    """Returns the PNG file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    closed = [s for s in run["steps"] if s["load"] == "concurrency"]
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for step in closed:
        series.setdefault((step["server"], step["mode"]), []).append(step)

    def label(server: str, mode: str) -> str:
        return f"{mode}" if len(run["servers"]) == 1 else f"{server} {mode}"

    if closed:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, name in zip(axes, ("ttft_ms", "e2el_ms"), strict=True):
            for (server, mode), steps in sorted(series.items()):
                xs = [s["value"] for s in steps]
                for stat, style in (("p50", "-o"), ("p99", "--x")):
                    ys = [s["summary"][name][stat] for s in steps]
                    ax.plot(xs, ys, style, label=f"{label(server, mode)} {stat}")
            short = name.split("_")[0].upper()
            _label_axes(ax, "concurrency", f"{short} (ms)", f"{short} vs concurrency")
        written.append(_save(fig, folder / "latency_vs_concurrency.png"))

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for (server, mode), steps in sorted(series.items()):
            xs = [s["value"] for s in steps]
            ax.plot(xs, [s["summary"]["output_token_throughput"] for s in steps], "-o", label=label(server, mode))
        _label_axes(ax, "concurrency", "output tokens/s", "Throughput vs concurrency")
        written.append(_save(fig, folder / "throughput_vs_concurrency.png"))

    ttfts: dict[str, list[float]] = {}
    for step in run["steps"]:
        for result in results[step["name"]]:
            value = ttft(result)
            if result.priority and result.outcome == "ok" and value is not None:
                ttfts.setdefault(f"{step['server']} {result.priority}", []).append(value * 1000)
    if ttfts:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, values in sorted(ttfts.items()):
            values.sort()
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=name)
        _label_axes(ax, "TTFT (ms)", "fraction of requests", "TTFT CDF per priority (all steps)")
        written.append(_save(fig, folder / "ttft_cdf_per_priority.png"))

    fig, ax = plt.subplots(figsize=(max(6.5, 0.6 * len(run["steps"])), 4.5))
    names = [f"{s['server']} {s['mode']}\n{s['load'][0]}={s['value']}" for s in run["steps"]]
    bottom = [0] * len(names)
    for outcome in ("ok", "rate_limited", "timeout", "error"):
        counts = [s["summary"]["outcomes"][outcome] for s in run["steps"]]
        ax.bar(names, counts, bottom=bottom, label=outcome)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylabel("requests")
    ax.set_title("Outcomes per step")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    written.append(_save(fig, folder / "outcomes_per_step.png"))
    return written


def _label_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name
