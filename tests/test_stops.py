"""`serve run` stopped as a user or a supervisor stops it, with streams running: SIGINT (Ctrl-C) or SIGTERM to its
process group, or `serve shutdown` from another shell. Every process of the engine (vLLM's server, its two API servers, its engine core) is gone within 30 s, its port and the
gateway's port are free, and `serve run` itself has exited. On a GPU host, before the reaper, the engine outlived a
SIGTERM and kept 58.7 GB of GPU memory; after `serve shutdown` with streams running it was still there 60 s later
(issue 19). The other ways a replica ends (`serve deploy` of a new config, a downscale, its node removed) are in tests/test_cluster.py; its process killed outright, in
tests/test_orphans.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import yaml
from conftest import free_port, port_taken, serve_run

pytestmark = pytest.mark.engine

BOUND_S = 30
APP = "stops"
MODEL = "smollm2-135m-instruct"


def _config(port: int) -> dict:
    args = {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 8, "api_server_count": 2},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 1,
                "max_ongoing_requests": 4,
            },
        },
        "http": {"host": "127.0.0.1", "port": port},
        "router": {"num_replicas": 1},
        "drain_timeout_s": 5,  # streams still running at a stop get 5 s, well within the 30 s bound on a busy machine
    }
    app = {"name": APP, "route_prefix": "/", "import_path": "serve_app.app:build_app", "args": args}
    return {"proxy_location": "Disabled", "applications": [app]}


def _engine() -> tuple[list[psutil.Process], int]:
    """Every process the app's LLMServer replica started, and its vLLM server's port."""
    [replica] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if f"ServeReplica:{APP}:LLMServer" in " ".join(p.info["cmdline"] or [])
    ]
    [server] = [c for c in replica.children() if "--port" in c.cmdline()]
    command = server.cmdline()
    return replica.children(recursive=True), int(command[command.index("--port") + 1])


def _streams(port: int, n: int) -> list[threading.Thread]:
    """`n` streams running in threads while the gateway stops: a stop must not wait for them past its drain."""

    def one() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 40}
        try:
            with httpx.stream(
                "POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": True}, timeout=120
            ) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.HTTPError:
            pass  # cut by the stop: what is checked is the engine, not the client

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "serve shutdown"])
def test_serve_run_stopped_with_streams_running_leaves_no_engine(how, tmp_path):
    port = free_port()
    config = tmp_path / "stops.yaml"
    config.write_text(yaml.safe_dump(_config(port)))
    serve = os.path.join(os.path.dirname(sys.executable), "serve")  # for `serve shutdown`
    run = serve_run(config, tmp_path / "serve-run.log", port)
    try:
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        engine, engine_port = _engine()
        assert len(engine) >= 3, [p.cmdline()[:3] for p in engine]  # the server, two API servers, the engine core
        streams = _streams(port, 2)
        time.sleep(3)

        if how == "serve shutdown":  # against the dashboard of the cluster that `serve run` started
            # Ray 2.60 starts a local cluster with token authentication on; the CLI sends the token (from
            # ~/.ray/auth_token) only with RAY_AUTH_MODE=token, and without it fails with exit code 0.
            shutdown = subprocess.run(
                [serve, "shutdown", "-y", "--address", "http://127.0.0.1:8265"],
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "RAY_AUTH_MODE": "token"},
            )
            assert "Sent shutdown request" in shutdown.stdout + shutdown.stderr, shutdown.stdout + shutdown.stderr
        else:
            os.killpg(run.pid, getattr(signal, how))
        stopped = time.monotonic()
        _, alive = psutil.wait_procs(engine, timeout=BOUND_S)
        left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        gone_s = time.monotonic() - stopped
        assert not left, f"left running {BOUND_S} s after {how}: {[(p.pid, p.cmdline()[:4]) for p in left]}"
        assert not port_taken(engine_port) and not port_taken(port), "the engine's port and the gateway's are free"
        for thread in streams:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a client's stream ended, one way or another"
        if how == "serve shutdown":  # `serve run` goes on until Ctrl-C; what is checked above is the engine
            os.killpg(run.pid, signal.SIGINT)
        try:
            run.wait(timeout=120)
        except subprocess.TimeoutExpired:
            assert how == "serve shutdown", f"serve run did not exit within 120 s of {how}"
        print(f"\n{how}: engine gone {gone_s:.1f} s after; serve run exited {run.returncode}")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
