"""A batch survives what kills its runner (issue 22). The Batches replica SIGKILLed mid-batch: Ray Serve starts a new
one, which takes the batch up from its store, and the slots the dead replica held are given back (its Router's
lease lapses). The whole gateway SIGKILLed mid-batch and started again: the batch resumes. Either way every line
is answered and each `custom_id` appears once in the output."""

from __future__ import annotations

import os
import signal

import psutil
import pytest
import yaml
from conftest import APP_NAME, free_port, port_taken, serve_run, wait_for
from test_batch_api import jsonl, nothing_running, request_line, sdk, submit, until_final

pytestmark = [pytest.mark.engine, pytest.mark.destructive]


def batches_replica() -> psutil.Process:
    found = [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"ServeReplica:{APP_NAME}:Batches" in " ".join(p.info["cmdline"] or [])
    ]
    assert len(found) == 1, [p.pid for p in found]
    return found[0]


def test_a_batch_survives_its_runner_being_killed_and_answers_each_line_once(gateway):
    client = sdk(gateway)
    ids = [f"r{i}" for i in range(10)]
    batch_id = submit(client, [request_line(custom_id, "Tell me a long story.", max_tokens=16) for custom_id in ids])
    done_before_kill = until_started(client, batch_id)
    killed = batches_replica()
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)

    batch = until_final(client, batch_id)
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == len(ids) and batch.request_counts.failed == 0, batch
    assert done_before_kill < len(ids), "the kill came mid-batch"
    output = jsonl(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ids, "each custom_id once, however often a line was sent"
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert batches_replica().pid != killed.pid
    state = nothing_running(gateway)
    assert state["in_flight"] == 0, state


def until_started(client, batch_id: str) -> int:
    """Waits until some lines are answered; returns how many were."""
    assert wait_for(lambda: client.batches.retrieve(batch_id).request_counts.completed >= 2, timeout_s=300)
    return client.batches.retrieve(batch_id).request_counts.completed


def test_a_whole_gateway_killed_mid_batch_finishes_the_batch_when_started_again(tmp_path):
    """SIGKILL to `serve run`'s process group (the gateway, its Ray, its engine), then `serve run` again on the
    same batch folder: the batch resumes and ends with each custom_id once."""
    port = free_port()
    args = {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 4},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 1,
                "max_ongoing_requests": 2,
            },
        },
        "http": {"host": "127.0.0.1", "port": port},
        "batch": {"directory": str(tmp_path / "batches")},
        "drain_timeout_s": 5,
    }
    app = {"name": "resume", "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args}
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump({"proxy_location": "Disabled", "applications": [app]}))
    log = tmp_path / "serve-run.log"
    gateway = f"http://127.0.0.1:{port}"
    ids = [f"k{i}" for i in range(12)]
    run = serve_run(config, log, port)
    try:
        client = sdk(gateway)
        batch_id = submit(
            client, [request_line(custom_id, "Tell me a long story.", max_tokens=16) for custom_id in ids]
        )
        done_before_kill = until_started(client, batch_id)
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert wait_for(lambda: not port_taken(port), timeout_s=60), "the killed gateway's port is free"

        run = serve_run(config, log, port)
        batch = until_final(client, batch_id)
        assert batch.status == "completed" and batch.request_counts.completed == len(ids), batch
        assert done_before_kill < len(ids), "the kill came mid-batch"
        output = jsonl(client, batch.output_file_id)
        assert [line["custom_id"] for line in output] == ids, "each custom_id once"
        os.killpg(run.pid, signal.SIGINT)
        run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
