"""vLLM's server as the LLMServer replica starts it (`vllm_compat.server_command`): every `vllm serve` option acts.

`python -m vllm.entrypoints.openai.api_server`, which the replica ran before, ignored `api_server_count`: a
config asking for two API servers got one, and nothing said so."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import psutil
from conftest import free_port, wait_for_server

from serve_app.engine import vllm_compat
from serve_app.engine.args import serve_argv
from serve_app.engine.model_files import DEFAULT_MODEL_ENGINE_KWARGS, DEFAULT_MODEL_SOURCE, resolve_model_source

START_TIMEOUT_S = 900  # a wait: once ran out at 400 s while another engine suite loaded the 2 cores (load 19)


def test_api_server_count_starts_that_many_servers_in_front_of_one_engine():
    port = free_port()
    options = {**DEFAULT_MODEL_ENGINE_KWARGS, "max_model_len": 512, "max_num_seqs": 4, "api_server_count": 2}
    argv = vllm_compat.server_command() + serve_argv(
        resolve_model_source(DEFAULT_MODEL_SOURCE), "m", options, "127.0.0.1", port
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        wait_for_server(url, proc, START_TIMEOUT_S)
        children = psutil.Process(proc.pid).children(recursive=True)
        api_servers = [c for c in children if "APIServer" in c.name() or "APIServer" in " ".join(c.cmdline())]
        assert len(api_servers) == 2, [c.name() for c in children]

        body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running{")]
        assert len(running) == 1, f"one engine, one gauge (what LLMServer.num_unfinished reads): {running}"
    finally:
        proc.send_signal(signal.SIGTERM)  # as LLMServer._stop does: vLLM stops its API servers and engine
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    # vLLM's server exits before the last of its children: multiprocessing's resource tracker (a plain `python`)
    # still cleans up shared memory then, slowly on a busy machine. Each must be gone within the 30 s that a
    # stopped engine is given (the cluster issue's bound), not at the instant the server itself exits.
    _, alive = psutil.wait_procs(children, timeout=30)
    left = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"left running 30 s after SIGTERM: {[(c.name(), c.cmdline()[:4]) for c in left]}"
