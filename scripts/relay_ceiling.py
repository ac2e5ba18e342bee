"""The relay's ceiling without a GPU: the real gateway (Routers, Admission, Metrics) in front of an engine
double, run side by side with the same double alone, as bare vLLM is in the GPU runs.

The double (`scripts/fake_engine.py`) streams at a set step time for every running request, so the engine is
never what limits, and costs a fraction of a real server's CPU. What the gateway adds is then measured
directly: throughput and TTFT against the double alone, and the CPU seconds its Routers and Admission spend
per request and per token, from which the tokens per second one Router core can relay follow. CPU time,
unlike wall time, holds up on a noisy shared machine.

    .venv/bin/python scripts/relay_ceiling.py --concurrency 1,32,128 --out docs/bench/relay-ceiling

The harness deploys the product's graph (`serve_app.app.compose_app`) with one change: the LLM replica
starts the double instead of `vllm serve`. Nothing here is part of the product.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import ray
from ray import serve

from serve_app.app import compose_app
from serve_app.bench.load import Target, run_step
from serve_app.bench.metrics import summarize
from serve_app.bench.workload import build_requests, load_prompts
from serve_app.config import LLMConfig
from serve_app.deployments.llm_server import LLMServer

ENGINE = Path(__file__).with_name("fake_engine.py")
ENGINE_ARGS_ENV = "RELAY_CEILING_ENGINE_ARGS"
MODEL = "fake-model"


class FakeEngineReplica(LLMServer):
    """The product's LLM replica (registration, health, drain, stop), starting the double as its server."""

    def server_command(self, config: LLMConfig, host: str, port: int) -> list[str]:
        extra = json.loads(os.environ.get(ENGINE_ARGS_ENV, "[]"))
        return [sys.executable, str(ENGINE), "--host", host, "--port", str(port), "--model", config.model_id, *extra]


def engine_flags(args: argparse.Namespace) -> list[str]:
    return [
        "--step-ms",
        str(args.step_ms),
        "--prefill-ms",
        str(args.prefill_ms),
        "--stream-interval",
        str(args.stream_interval),
    ]


def processes(match: str) -> list[psutil.Process]:
    """This harness's own processes (its Ray cluster is its child) whose command line has `match`."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if match in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def start_profile(pid: int, seconds: float) -> tuple[subprocess.Popen, Path]:
    """py-spy's collapsed stacks of one Router (`--nonblocking`: the Router is never paused)."""
    path = Path(tempfile.mkdtemp()) / "router.txt"
    spy_bin = Path(sys.executable).with_name("py-spy")
    command = [
        str(spy_bin) if spy_bin.exists() else "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(int(seconds)),
        "--rate",
        "100",
    ]
    command += ["--format", "raw", "--nonblocking", "--output", str(path)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return spy, path


def profile_table(profile: tuple[subprocess.Popen, Path], top: int = 12) -> str:
    """Where the Router's samples are: by the function on top of the stack, and the share in our own code."""
    spy, path = profile
    spy.wait(120)
    own: dict[str, int] = {}
    total = ours = 0
    for row in path.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        total += int(count)
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        ours += int(count) if any("serve_app/" in f for f in frames) else 0
    if not total:
        return "py-spy took no samples\n"
    rows = [f"py-spy, one Router, {total} samples; {100 * ours / total:.0f}% under serve_app's code.", ""]
    rows += ["| function on top of the stack | share |", "|---|---|"]
    for leaf, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        rows.append(f"| `{leaf}` | {100 * count / total:.1f}% |")
    return "\n".join(rows) + "\n"


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready in {timeout_s:.0f}s")


def one_step(target: Target, concurrency: int, count: int, max_tokens: int, seed: int) -> tuple[dict, float]:
    specs = build_requests(count, load_prompts(None), max_tokens, {}, seed)
    run = run_step(target, "async", specs, concurrency=concurrency)
    summary = summarize(run.results, run.duration_s, {})
    summary["client_cpu_s"] = run.client_cpu_s
    return summary, run.duration_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,32,128")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--min-requests", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="direct, gateway, direct, gateway, ... per concurrency")
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--slots", type=int, default=256, help="the replica's max_ongoing_requests")
    p.add_argument("--step-ms", type=float, default=10.0)
    p.add_argument("--prefill-ms", type=float, default=0.0)
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--direct-port", type=int, default=8101)
    p.add_argument("--profile", type=float, default=0, help="py-spy one Router for this many seconds at the top step")
    p.add_argument("--out", default=None, help="folder for results.json and report.md")
    args = p.parse_args()

    direct_url = f"http://127.0.0.1:{args.direct_port}"
    gateway_url = f"http://127.0.0.1:{args.port}"
    direct = subprocess.Popen([sys.executable, str(ENGINE), "--port", str(args.direct_port), *engine_flags(args)])
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve", log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        app_args = {
            "http": {"host": "127.0.0.1", "port": args.port},
            "router": {"num_replicas": args.routers},
            "llm": {
                "model_id": MODEL,
                "num_cpus": 0,
                "env_vars": {ENGINE_ARGS_ENV: json.dumps(engine_flags(args))},
                "autoscaling": {
                    "min_replicas": 1,
                    "max_replicas": 1,
                    "target_ongoing_requests": args.slots // 2,
                    "max_ongoing_requests": args.slots,
                },
            },
        }
        deployment = serve.deployment(FakeEngineReplica, name="LLMServer")
        serve.run(compose_app(app_args, deployment), name="gateway", route_prefix="/", blocking=False)
        wait_ready(direct_url)
        wait_ready(gateway_url)
        groups = {
            "router": processes("ServeReplica:gateway:Router"),
            "admission": processes("AdmissionActor") + processes("ServeReplica:gateway:Admission"),
            "engine": [p for p in processes(str(ENGINE)) if f"--port {args.direct_port}" not in " ".join(p.cmdline())],
        }
        print({name: len(procs) for name, procs in groups.items()}, "processes")
        targets = {
            "direct": Target(direct_url, MODEL, ignore_eos=True),
            "gateway": Target(gateway_url, MODEL, ignore_eos=True),
        }
        for target in targets.values():  # warm-up: connections, first-call paths
            one_step(target, 4, 8, 8, seed=99)
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        steps: list[dict[str, Any]] = []
        profile = None
        for concurrency in concurrencies:
            count = max(args.min_requests, concurrency * args.requests_per_client)
            for round_ in range(args.rounds):
                for server, target in targets.items():
                    if args.profile and server == "gateway" and concurrency == concurrencies[-1] and round_ == 0:
                        profile = start_profile(groups["router"][0].pid, args.profile)
                    before = {name: cpu_seconds(procs) for name, procs in groups.items()}
                    summary, duration = one_step(target, concurrency, count, args.max_tokens, seed=round_)
                    used = {name: cpu_seconds(procs) - before[name] for name, procs in groups.items()}
                    step = {"server": server, "concurrency": concurrency, "round": round_, "summary": summary}
                    steps.append({**step, "cpu_s": used, "duration_s": duration})
                    print(line(steps[-1]), flush=True)
        report = markdown(steps, args)
        if profile is not None:
            report += "\n" + profile_table(profile)
        print(report)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps({"args": vars(args), "steps": steps}, indent=1))
            (out / "report.md").write_text(report)
    finally:
        serve.shutdown()
        ray.shutdown()
        direct.terminate()
    return 0


def line(step: dict[str, Any]) -> str:
    s = step["summary"]
    return (
        f"{step['server']:>7} c={step['concurrency']:<4} ok {s['outcomes'].get('ok', 0):>4} "
        f"{s['output_token_throughput']:>8.0f} tok/s  TTFT p50 {s['ttft_ms']['p50']:.1f} ms  "
        f"router cpu {step['cpu_s']['router']:.2f}s admission {step['cpu_s']['admission']:.2f}s"
    )


def markdown(steps: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Each row is the mean of the rounds' figures; CPU is what the load added to the idle gateway."""
    rows = [
        f"Engine double: one step every {args.step_ms:g} ms, stream interval {args.stream_interval}, "
        f"{args.max_tokens} tokens per request; {args.routers} Routers.",
        "",
        "| c | direct tok/s | gateway tok/s | ratio | TTFT p50 direct / gateway (ms) | added TTFT p50 (ms) "
        "| Router CPU ms / request | Router CPU µs / token | Admission CPU ms / request | tokens per Router core-second |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency in sorted({s["concurrency"] for s in steps}):

        def mean(server: str, get: Any, concurrency: int = concurrency) -> float:
            values = [get(s) for s in steps if s["concurrency"] == concurrency and s["server"] == server]
            return sum(values) / len(values)

        d_tok = mean("direct", lambda s: s["summary"]["output_token_throughput"])
        g_tok = mean("gateway", lambda s: s["summary"]["output_token_throughput"])
        d_ttft = mean("direct", lambda s: s["summary"]["ttft_ms"]["p50"])
        g_ttft = mean("gateway", lambda s: s["summary"]["ttft_ms"]["p50"])
        ok = mean("gateway", lambda s: s["summary"]["outcomes"].get("ok", 0))
        tokens = mean("gateway", lambda s: s["summary"]["total_output_tokens"])
        # The Routers' and Admission's idle CPU (health checks, metrics flushes, Ray's threads), measured
        # while the double alone was loaded, is taken off the gateway's steps.
        idle = {g: mean("direct", lambda s, g=g: s["cpu_s"][g] / s["duration_s"]) for g in ("router", "admission")}
        duration = mean("gateway", lambda s: s["duration_s"])
        router = mean("gateway", lambda s: s["cpu_s"]["router"]) - idle["router"] * duration
        admission = mean("gateway", lambda s: s["cpu_s"]["admission"]) - idle["admission"] * duration
        rows.append(
            f"| {concurrency} | {d_tok:,.0f} | {g_tok:,.0f} | {g_tok / d_tok:.2f} | {d_ttft:.1f} / {g_ttft:.1f} "
            f"| {g_ttft - d_ttft:+.1f} | {router / ok * 1000:.2f} | {router / tokens * 1e6:.0f} "
            f"| {admission / ok * 1000:.2f} | {tokens / router:,.0f} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
