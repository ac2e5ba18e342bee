"""`serve-app-bench`: sync vs async clients, concurrency and rate sweeps, per-priority latency, A/B ratios.

Prompts: built-in, a JSONL file (--prompts), unique synthetic prompts of about N tokens (--prompt-tokens N), or
K shared prefixes with unique suffixes (--prefixes K --prefix-tokens L --suffix-tokens S); see
serve_app/bench/workload.py. Synthetic prompts differ from step to step (A and B of a step get the same ones),
so no step finds an earlier step's prompts in the prefix cache; the K prefixes are the same in every step.
--engine-metrics reads the engines' prefix-cache counters around each step; a gateway's queue wait per request
(its X-Queue-Wait-Ms header) is summarized when it is sent.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from serve_app.bench.clients import RequestResult
from serve_app.bench.load import Target, run_step
from serve_app.bench.metrics import (
    engine_urls,
    parse_slo,
    prefix_cache_delta,
    prefix_cache_line,
    scrape_prefix_cache,
    summarize,
)
from serve_app.bench.report import markdown, plot, ratios, write_requests
from serve_app.bench.workload import (
    add_workload_arguments,
    arrival_times,
    build_requests,
    load_prompts,
    parse_priority_mix,
    workload_from_args,
)

QUICK = {"concurrency": "1,4,8", "max_tokens": 32, "mode": "both", "warmup": 2, "requests_per_client": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="serve-app-bench",
        description="Benchmark any OpenAI-compatible server with streaming requests.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server A")
    p.add_argument("--compare", metavar="URL2", help="server B: every step runs against A then B, and B/A is reported")
    p.add_argument("--model", help="model id (default: the first from /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--mode", choices=["sync", "async", "both"], default="both", help="client mode(s)")
    p.add_argument("--concurrency", default=None, help="closed loop: comma list, e.g. 1,5,10,20,30,50")
    p.add_argument("--rate", default=None, help="open loop: comma list of requests/s, e.g. 1,2,4")
    p.add_argument("--arrival", choices=["poisson", "constant"], default="poisson", help="open-loop arrivals")
    p.add_argument("--requests", type=int, help="requests per step (default: see --requests-per-client)")
    p.add_argument(
        "--requests-per-client", type=int, default=4, help="closed loop: requests per step = this x concurrency, >= 8"
    )
    p.add_argument("--max-tokens", type=int, default=64, help="fixed output length; 0 lets the model stop")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to generate exactly max-tokens")
    p.add_argument("--prompts", type=Path, help="JSONL file of prompts (default: built-in prompts)")
    p.add_argument("--priority-mix", help="e.g. high:0.2,medium:0.3,low:0.5 (sent in the priority header)")
    p.add_argument("--priority-header", default="X-Priority")
    p.add_argument(
        "--priority-as",
        choices=["header", "vllm"],
        default="header",
        help="send the class in the priority header, or as bare vLLM's integer `priority` field",
    )
    p.add_argument(
        "--engine-metrics",
        metavar="auto|URL,...",
        help="read vLLM's prefix-cache counters around each step: a comma list of vLLM base URLs (server A "
        "only), or auto: each server's /metrics/targets (a gateway), else the server itself (bare vLLM)",
    )
    p.add_argument("--slo", help="goodput SLOs, e.g. ttft_ms=500,tpot_ms=50,e2el_ms=5000")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, s")
    p.add_argument("--sync-workers", type=int, default=64, help="thread pool size of the sync client in open loop")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded requests per server before the run")
    p.add_argument("--wait-ready", type=float, default=0.0, help="wait up to this many s for the servers to answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="run folder (default: bench-runs/<time>)")
    p.add_argument("--quick", action="store_true", help="a < 2 min smoke run: " + json.dumps(QUICK))
    p.add_argument("--no-plots", action="store_true")
    add_workload_arguments(p)
    if p.parse_args(argv).quick:  # the preset only changes defaults: explicit flags still win
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
    if not args.concurrency and not args.rate:
        args.concurrency = "1,5,10"
    return args


def numbers(text: str | None, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()] if text else []


def discover_model(url: str, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = httpx.get(f"{url}/v1/models", timeout=10)
            if response.status_code == 200:
                return response.json()["data"][0]["id"]
            problem = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise SystemExit(f"serve-app-bench: {url} is not answering /v1/models ({problem})")
        time.sleep(2)


def plan(args: argparse.Namespace, servers: dict[str, str]) -> list[dict[str, Any]]:
    modes = ["sync", "async"] if args.mode == "both" else [args.mode]
    loads = [("concurrency", c) for c in numbers(args.concurrency, int)]
    loads += [("rate", r) for r in numbers(args.rate, float)]
    steps = []
    for load, value in loads:
        for mode in modes:
            for server in servers:  # alternate A, B, A, B so drift on a shared machine hits both alike
                name = f"{server}-{mode}-{load[0]}{value:g}"
                steps.append({"name": name, "server": server, "mode": mode, "load": load, "value": value})
    return steps


def step_size(args: argparse.Namespace, load: str, value: float) -> int:
    if args.requests:
        return args.requests
    if load == "concurrency":
        return max(8, int(args.requests_per_client * value))
    return max(10, math.ceil(20 * value))  # open loop: 20 s of the schedule


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    servers = {"A": args.url.rstrip("/")}
    if args.compare:
        servers["B"] = args.compare.rstrip("/")
    try:
        mix, slo = parse_priority_mix(args.priority_mix), parse_slo(args.slo)
        workload = workload_from_args(args, load_prompts(args.prompts))
        if args.compare and args.engine_metrics not in (None, "auto"):
            raise ValueError("with --compare, --engine-metrics takes only auto (each server's own engines)")
    except (ValueError, OSError) as exc:
        print(f"serve-app-bench: {exc}", file=sys.stderr)
        return 2
    model = args.model or discover_model(servers["A"], args.wait_ready)
    for url in servers.values():
        discover_model(url, args.wait_ready)
    started = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = args.out or Path("bench-runs") / started
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "requests.jsonl").write_text("")
    max_tokens = args.max_tokens or None
    targets = {
        name: Target(url, model, args.endpoint, args.priority_header, args.ignore_eos, args.timeout, args.priority_as)
        for name, url in servers.items()
    }
    steps = plan(args, servers)
    engines = {name: engine_urls(args.engine_metrics, url) for name, url in servers.items()}
    sizes = [step_size(args, s["load"], s["value"]) for s in steps]

    from tqdm import tqdm

    for name, target in targets.items():
        if args.warmup:
            warm = build_requests(args.warmup, workload, 8, {}, args.seed, run="warmup")
            run_step(target, "async", warm, concurrency=args.warmup)
            print(f"warmed up server {name} ({servers[name]})", file=sys.stderr)

    all_results: dict[str, list[RequestResult]] = {}
    bar = tqdm(total=sum(sizes), unit="req", file=sys.stderr, dynamic_ncols=True)
    for step, size in zip(steps, sizes, strict=True):
        bar.set_description(step["name"])
        # A step's own synthetic prompts (the same for A and B): none is in the cache from an earlier step.
        run_tag = f"{step['mode']}-{step['load'][0]}{step['value']:g}"
        specs = build_requests(size, workload, max_tokens, mix, args.seed, run=run_tag)
        before = scrape_prefix_cache(engines[step["server"]])
        if step["load"] == "concurrency":
            kwargs: dict[str, Any] = {"concurrency": int(step["value"])}
        else:
            kwargs = {"arrivals": arrival_times(size, step["value"], args.arrival, args.seed)}
        run = run_step(
            targets[step["server"]],
            step["mode"],
            specs,
            sync_workers=args.sync_workers,
            progress=lambda _: bar.update(1),
            **kwargs,
        )
        step["summary"] = summarize(run.results, run.duration_s, slo)
        step["summary"]["client_cpu_ms_per_request"] = 1000 * run.client_cpu_s / max(len(run.results), 1)
        if engines[step["server"]]:
            step["summary"]["prefix_cache"] = prefix_cache_delta(before, scrape_prefix_cache(engines[step["server"]]))
        all_results[step["name"]] = run.results
        write_requests(folder / "requests.jsonl", step, run.results)
        s = step["summary"]
        bar.write(
            f"{step['name']}: ok {s['outcomes']['ok']}/{s['requests']}, {s['output_token_throughput']:.0f} tok/s, "
            f"TTFT p50 {s['ttft_ms']['p50'] or 0:.0f} ms, E2EL p99 {s['e2el_ms']['p99'] or 0:.0f} ms"
            + (" [client-bound]" if s.get("client_bound") else "")
            + (f", queue wait p99 {s['queue_wait_ms']['p99']:.0f} ms" if "queue_wait_ms" in s else "")
        )
        if "prefix_cache" in s:
            bar.write(f"{step['name']}: {prefix_cache_line(s['prefix_cache'])}")
    bar.close()

    result = {
        "started": started,
        "command": "serve-app-bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "servers": servers,
        "model": model,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps": steps,
        "ratios": ratios(steps) if len(servers) > 1 else [],
    }
    result["plots"] = [] if args.no_plots else plot(result, all_results, folder)
    (folder / "results.json").write_text(json.dumps(result, indent=2))
    (folder / "report.md").write_text(markdown(result))
    print(f"wrote {folder}/report.md, results.json, requests.jsonl and {len(result['plots'])} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
