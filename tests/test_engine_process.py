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


def test_a_server_killed_outright_leaves_no_engine_behind():
    """SIGKILL to vLLM's server process (an OOM kill, a crash) gives it no chance to stop its engine core: the
    reaper `server_process` forks at start kills the server's whole group `GRACE_S` later. Before it, the
    engine core and its worker were left running on CPU, adopted by init, as on the H200 (58.7 GB held)."""
    from serve_app.deployments.llm_server import _die_with_parent
    from serve_app.engine.server_process import GRACE_S

    port = free_port()
    options = {**DEFAULT_MODEL_ENGINE_KWARGS, "max_model_len": 512, "max_num_seqs": 4}
    argv = vllm_compat.server_command() + serve_argv(
        resolve_model_source(DEFAULT_MODEL_SOURCE), "m", options, "127.0.0.1", port
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    # as the replica starts it: its own process group, SIGTERM when this (the replica) dies
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    group: list[psutil.Process] = []
    try:
        wait_for_server(f"http://127.0.0.1:{port}", proc, START_TIMEOUT_S)
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == proc.pid and p.pid != proc.pid]
        names = [" ".join(p.cmdline()[:3]) or p.name() for p in group]
        assert len(group) >= 2, f"the reaper and vLLM's engine core at least: {names}"
        proc.kill()
        proc.wait(10)
        _, alive = psutil.wait_procs(group, timeout=GRACE_S + 30)
        left = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"left running after the server was killed: {[(p.pid, p.cmdline()[:4]) for p in left]}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
