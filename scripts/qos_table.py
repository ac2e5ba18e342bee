"""Turns scripts/qos_bench.sh's results into the table of docs/benchmarks.md: per class TTFT (from the
scheduled send time) against the unloaded high p99, 429s and their Retry-After, and throughput against
the FCFS peak. Usage: python scripts/qos_table.py docs/bench/qos-cpu"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["steps"][0]["summary"]


def main(out: Path) -> None:
    peak = summary(out / "peak")
    print(
        f"FCFS peak (bare vLLM, 64 concurrent): {peak['request_throughput']:.2f} req/s, "
        f"{peak['output_token_throughput']:.0f} tok/s\n"
    )
    print(
        "| server | class | ok | 429 (with Retry-After) | 429 latency p99 | TTFT p50 | TTFT p99 | p99 / unloaded p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    totals = []
    for name in ("bare", "gateway"):
        unloaded = summary(out / f"unloaded-{name}")["ttft_from_intended_ms"]["p99"]
        loaded = summary(out / f"overload-{name}")
        for cls in ("high", "medium", "low"):
            part = loaded["per_priority"].get(cls)
            if part is None:
                continue
            ttft = part["ttft_from_intended_ms"]
            refused = part["rejections"]
            ratio = ttft["p99"] / unloaded if ttft["p99"] and unloaded else None
            print(
                f"| {name} | {cls} | {part['completed']} | {refused['count']} ({refused['with_retry_after']}) "
                f"| {fmt(refused['latency_ms']['p99'])} ms | {fmt(ttft['p50'])} ms | {fmt(ttft['p99'])} ms "
                f"| {fmt(ratio, 2)} (unloaded {fmt(unloaded)} ms) |"
            )
        totals.append((name, loaded))
    print("\n| server | completed | req/s | output tok/s | tok/s / FCFS peak |")
    print("|---|---|---|---|---|")
    for name, loaded in totals:
        share = loaded["output_token_throughput"] / peak["output_token_throughput"]
        print(
            f"| {name} | {loaded['completed']}/{loaded['requests']} | {loaded['request_throughput']:.2f} "
            f"| {loaded['output_token_throughput']:.0f} | {share:.2f} |"
        )


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    main(Path(sys.argv[1]))
