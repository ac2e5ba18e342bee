"""A Batch API run, measured from outside: how fast a batch's lines finish, second by second, and whether every
line came back once.

It writes a JSONL file of `--lines` short synthetic prompts (unique, so no prefix cache helps), uploads it with
the OpenAI SDK, creates a batch, and polls the gateway's `/v1/stats` once a second for the batch's output-token
counter until the batch ends. Then it downloads the output and checks each `custom_id` is there exactly once.

    python -m serve_app.bench.batch_fill --url http://127.0.0.1:8000 --lines 10000 --max-tokens 128 --out b.json

Its `timeline` is the (unix time, batch output tokens so far, share of spare slots batch lines held) series: scripts/gpu/batch_fill.sh reads the batch's
tokens/s over the window an interactive run covered from it."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

from openai import OpenAI

from serve_app.bench.workload import tagged_text


def batch_file(lines: int, prompt_tokens: int, max_tokens: int, model: str, seed: int) -> bytes:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        text = tagged_text(f"line {i} seed {seed}:", prompt_tokens, rng)
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "ignore_eos": True,  # a fixed output length, as the interactive runs have
        }
        out.append(
            json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(out) + "\n").encode()


def batch_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=10) as r:
        return json.load(r)["batch"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first from /v1/models")
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--api-key", default="none")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up on the batch after this many seconds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    client = OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=5)
    model = args.model or client.models.list().data[0].id
    data = batch_file(args.lines, args.prompt_tokens, args.max_tokens, model, args.seed)
    file = client.files.create(file=("batch.jsonl", data), purpose="batch")
    tokens_before = batch_stats(args.url)["batch_output_tokens"]
    created = time.time()
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    print(f"batch {batch.id}: {args.lines} lines", flush=True)
    timeline: list[tuple[float, int, float | None]] = [(created, 0, None)]
    while time.time() - created < args.timeout:
        time.sleep(1.0)
        stats = batch_stats(args.url)
        timeline.append((time.time(), stats["batch_output_tokens"] - tokens_before, stats.get("spare_slots_used")))
        batch = client.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            break
        if len(timeline) % 10 == 0:
            counts = batch.request_counts
            print(f"  {batch.status}: {counts.completed}/{counts.total} done, {counts.failed} failed", flush=True)
    ended = time.time()
    ids: Counter[str] = Counter()
    failed = 0
    if batch.output_file_id:
        for line in client.files.content(batch.output_file_id).text.splitlines():
            entry = json.loads(line)
            ids[entry["custom_id"]] += 1
            failed += entry["response"]["status_code"] != 200
    errors = []
    if batch.error_file_id:
        errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    expected = {f"line-{i}" for i in range(args.lines)}
    summary: dict[str, Any] = {
        "batch_id": batch.id,
        "status": batch.status,
        "lines": args.lines,
        "request_counts": batch.request_counts.model_dump() if batch.request_counts else None,
        "answered": len(ids),
        "answered_twice": sum(1 for n in ids.values() if n > 1),
        "missing": len(expected - set(ids)),
        "non_200": failed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "created_at": created,
        "ended_at": ended,
        "output_tokens": timeline[-1][1],
        "output_token_throughput": timeline[-1][1] / max(ended - created, 1e-9),
        "timeline": timeline,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f)
    print(
        f"batch {batch.status}: {len(ids)}/{args.lines} answered ({summary['answered_twice']} twice, "
        f"{summary['missing']} missing, {failed} non-200, {len(errors)} errors), "
        f"{summary['output_token_throughput']:.0f} output tok/s over {ended - created:.0f} s",
        flush=True,
    )
    return 0 if batch.status == "completed" and not summary["missing"] and not summary["answered_twice"] else 1


if __name__ == "__main__":
    sys.exit(main())
