"""`serve-app-batch`: run a JSONL file of requests as a batch on the gateway, follow it with a progress bar, and
download its results, through the OpenAI SDK's Batch API.

    serve-app-batch submit requests.jsonl --out results.jsonl     # upload, run, follow, download
    serve-app-batch follow batch_...   --out results.jsonl        # attach again (after Ctrl-C, or from elsewhere)
    serve-app-batch cancel batch_...

Ctrl-C while following leaves the batch running on the gateway; `follow` picks it up again."""

from __future__ import annotations

import argparse
import os
import sys
import time

import openai
from tqdm import tqdm

from serve_app.client import DEFAULT_URL

FINAL = ("completed", "failed", "expired", "cancelled")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve-app-batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="the gateway (default %(default)s; env SERVE_APP_URL)")
    parser.add_argument("--api-key", default=None, help="an API key, when the gateway has keys (env SERVE_APP_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="upload a JSONL file and run it as a batch")
    submit.add_argument("file", help="one request per line: custom_id, method, url, body")
    submit.add_argument(
        "--endpoint", default="/v1/chat/completions", choices=["/v1/chat/completions", "/v1/completions"]
    )
    submit.add_argument("--no-wait", action="store_true", help="print the batch's id and return")
    follow = commands.add_parser("follow", help="follow a batch until it ends, then download its results")
    follow.add_argument("batch_id")
    for command in (submit, follow):
        command.add_argument("--out", default=None, help="the output lines (default <batch id>.output.jsonl)")
        command.add_argument(
            "--errors",
            default=None,
            help="the error lines (default: beside --out, as <out>.errors.jsonl; else <batch id>.errors.jsonl)",
        )
    cancel = commands.add_parser("cancel", help="cancel a batch: no new line starts; running ones are cut")
    cancel.add_argument("batch_id")
    return parser.parse_args(argv)


def result_paths(batch_id: str, out: str | None, errors: str | None) -> tuple[str, str]:
    """Where the output and error lines go: the error lines beside `--out` when only that is given, so that a
    run's results stay together."""
    if out is None:
        return f"{batch_id}.output.jsonl", errors or f"{batch_id}.errors.jsonl"
    stem = out[: -len(".jsonl")] if out.endswith(".jsonl") else out
    return out, errors or f"{stem}.errors.jsonl"


def follow(api: openai.OpenAI, batch_id: str, out: str | None, errors: str | None) -> int:
    batch = api.batches.retrieve(batch_id)
    bar = tqdm(desc=batch_id[:20], unit="line", total=batch.request_counts.total if batch.request_counts else None)
    try:
        while True:
            counts = batch.request_counts
            if counts is not None:
                bar.total = counts.total
                bar.n = counts.completed + counts.failed
                bar.set_postfix_str(f"{batch.status}, {counts.failed} failed", refresh=True)
            if batch.status in FINAL:
                break
            time.sleep(1)
            batch = api.batches.retrieve(batch_id)
    finally:
        bar.close()
    out, errors = result_paths(batch_id, out, errors)
    for file_id, path in ((batch.output_file_id, out), (batch.error_file_id, errors)):
        if file_id is None:
            continue
        with open(path, "wb") as f:
            f.write(api.files.content(file_id).content)
        print(f"wrote {path}")
    if batch.status == "failed" and batch.errors is not None:
        for error in batch.errors.data or []:
            print(f"failed: {error.code}: {error.message}", file=sys.stderr)
    print(f"batch {batch_id} {batch.status}: {batch.request_counts}")
    return 0 if batch.status == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    key = args.api_key or os.environ.get("SERVE_APP_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    api = openai.OpenAI(base_url=f"{args.url.rstrip('/')}/v1", api_key=key)
    try:
        if args.command == "cancel":
            batch = api.batches.cancel(args.batch_id)
            print(f"batch {batch.id} {batch.status}")
            return 0
        if args.command == "follow":
            return follow(api, args.batch_id, args.out, args.errors)
        with open(args.file, "rb") as f:
            upload = api.files.create(file=(os.path.basename(args.file), f.read()), purpose="batch")
        batch = api.batches.create(input_file_id=upload.id, endpoint=args.endpoint, completion_window="24h")
        print(f"batch {batch.id} submitted ({upload.bytes} bytes); follow it with: serve-app-batch follow {batch.id}")
        return 0 if args.no_wait else follow(api, batch.id, args.out, args.errors)
    except openai.APIStatusError as exc:
        print(f"error {exc.status_code}: {exc.message}", file=sys.stderr)
        return 2
    except openai.APIConnectionError as exc:
        print(f"cannot reach the gateway at {args.url}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped following; the batch goes on (serve-app-batch follow <id>)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
