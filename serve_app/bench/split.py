"""One open-loop schedule spread over several client processes, merged into one summary.

A single Python client saturates near 15k tokens/s; past that it measures itself. Each process
sends its share (rate / N, its own Poisson seed) on a clock shared through a common start time,
and the results are summarized together, per priority, as one run.

    python -m serve_app.bench.split --url http://127.0.0.1:8000 --rate 80 --processes 4 \\
        --requests 2400 --max-tokens 256 --priority-mix high:0.2,medium:0.3,low:0.5 --out run.json

Workloads (serve_app/bench/workload.py): the built-in prompts by default; `--prompt-tokens 2048` for unique
prompts of about 2048 tokens; `--prefixes 32 --prefix-tokens 4096 --suffix-tokens 64` for 32 shared prefixes
(the same in every process: they come from --seed alone) each followed by a unique suffix. Process i uses seed
--seed + i for its priorities, arrivals and suffixes: give each run its own --seed (spaced by at least
--processes) so that no run repeats an earlier run's prompts into a warm prefix cache.

`--engine-metrics auto` (or a comma list of vLLM base URLs) reads the engines' prefix-cache counters before and
after the run and reports the hit rate; the gateway's queue wait per request (its X-Queue-Wait-Ms header) is
summarized per priority when the server sends it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from typing import Any

from serve_app.bench.clients import RequestResult
from serve_app.bench.load import Target, run_step
from serve_app.bench.metrics import engine_urls, prefix_cache_delta, prefix_cache_line, scrape_prefix_cache, summarize
from serve_app.bench.workload import (
    Workload,
    add_workload_arguments,
    arrival_times,
    build_requests,
    parse_priority_mix,
    workload_from_args,
)


def _worker(job: dict[str, Any]) -> tuple[list[dict[str, Any]], float, float]:
    target = Target(**job["target"])
    specs = build_requests(job["count"], job["workload"], job["max_tokens"], job["mix"], job["seed"])
    arrivals = arrival_times(job["count"], job["rate"], "poisson", job["seed"])
    delay = job["start_at"] - time.time()
    if delay > 0:
        time.sleep(delay)
    run = run_step(target, "async", specs, arrivals=arrivals)
    return [r.to_dict() for r in run.results], run.duration_s, run.client_cpu_s


def make_jobs(
    args: argparse.Namespace, target: dict[str, Any], workload: Workload, mix: dict[str, float], start_at: float
) -> list[dict[str, Any]]:
    """One job per process: its share of the schedule, its own seed (arrivals, priorities, suffixes and tags),
    and the one workload whose shared prefixes come from the base seed, so every process sends the same ones."""
    return [
        {
            "target": target,
            "count": args.requests // args.processes,
            "rate": args.rate / args.processes,
            "max_tokens": args.max_tokens,
            "mix": mix,
            "workload": workload,
            "seed": args.seed + i,
            "start_at": start_at,
        }
        for i in range(args.processes)
    ]


def _queue_wait(summary: dict[str, Any]) -> str:
    wait = summary.get("queue_wait_ms")
    return f", queue wait p50 {wait['p50']:.0f} p90 {wait['p90']:.0f} p99 {wait['p99']:.0f} ms" if wait else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first from /v1/models")
    p.add_argument("--rate", type=float, required=True, help="total requests/s over all processes")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--requests", type=int, required=True, help="total requests")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--priority-mix", default=None)
    p.add_argument("--priority-as", choices=["header", "vllm"], default="header")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument(
        "--engine-metrics",
        default=None,
        metavar="auto|URL,...",
        help="vLLM servers whose prefix-cache counters are read before and after the run; auto: the gateway's "
        "/metrics/targets, or the server itself (bare vLLM)",
    )
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the merged summary here (JSON)")
    add_workload_arguments(p)
    args = p.parse_args(argv)
    try:
        workload, mix = workload_from_args(args), parse_priority_mix(args.priority_mix)
    except ValueError as exc:
        p.error(str(exc))

    import httpx

    model = args.model or httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    target = {
        "base_url": args.url,
        "model": model,
        "endpoint": args.endpoint,
        "ignore_eos": True,
        "timeout_s": args.timeout,
        "priority_as": args.priority_as,
    }
    engines = engine_urls(args.engine_metrics, args.url)
    before = scrape_prefix_cache(engines) if engines else {}
    jobs = make_jobs(args, target, workload, mix, time.time() + 2.0)  # every process starts at one moment
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        parts = pool.map(_worker, jobs)
    results = [RequestResult(**r) for rows, _, _ in parts for r in rows]
    duration_s = max(d for _, d, _ in parts)
    summary = summarize(results, duration_s, {})
    summary["client_cpu_s_per_process"] = [c for _, _, c in parts]
    summary["settings"] = vars(args)
    if engines:
        summary["prefix_cache"] = prefix_cache_delta(before, scrape_prefix_cache(engines))
    line = f"{args.url}: ok {summary['completed']}/{summary['requests']} in {duration_s:.1f}s"
    line += f" ({summary['request_throughput']:.1f} req/s, {summary['output_token_throughput']:.0f} tok/s)"
    print(line + (" [client-bound]" if summary.get("client_bound") else "") + _queue_wait(summary))
    for name, part in summary.get("per_priority", {}).items():
        ttft, late = part["ttft_ms"], part.get("ttft_from_intended_ms") or {}
        refused = part["rejections"]
        print(
            f"  {name:6s} ok {part['completed']}/{part['requests']} rejected {refused['count']} "
            f"({refused['with_retry_after']} with Retry-After, p99 {refused['latency_ms']['p99'] or 0:.0f} ms) "
            f"TTFT p50 {ttft['p50'] or 0:.0f} ms p99 {ttft['p99'] or 0:.0f} ms, "
            f"from schedule p50 {late.get('p50') or 0:.0f} p99 {late.get('p99') or 0:.0f} ms" + _queue_wait(part)
        )
    if "prefix_cache" in summary:
        print("  " + prefix_cache_line(summary["prefix_cache"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
