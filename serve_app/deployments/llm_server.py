"""One vLLM engine per Ray Serve replica, served by vLLM's own OpenAI server in a child process.

The replica holds the GPU and supervises `vllm serve` on a free port of its node; the Routers
send requests to that server directly, so every token is written by the same code, in the same
kind of process (uvloop, no other threads), as in bare vLLM. Measured on an H200: hosting the
engine inside the replica process instead cost 5-15% of throughput, because Ray's own threads
share that process's GIL with the engine's output loop (docs/benchmarks.md).

The replica registers the server's address with the Admission deployment, leaves it before it
stops, and stops the server if the replica dies (PR_SET_PDEATHSIG); a reaper in the server's process
group (`engine/server_process.py`) kills whatever of it is left 10 s later, so a GPU is not left orphaned.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from typing import Any

import aiohttp
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.config import NO_ACCESS_LOG, LLMConfig
from serve_app.deployments import process_priority
from serve_app.deployments.admission_client import AdmissionClient
from serve_app.deployments.health import answers_health, health_status
from serve_app.engine import vllm_compat
from serve_app.engine.args import parse_serve_args, serve_argv
from serve_app.engine.model_files import resolve_model_source

logger = logging.getLogger("ray.serve")

STOP_TIMEOUT_S = 10  # vLLM stops in a few seconds; past this its group is killed, so a stop frees the GPU soon
ENGINE_IDLE_S = 3.0  # draining: the engine idle this long outweighs slots Admission still counts (lost releases)


class EngineExited(RuntimeError):
    pass


class LLMServer:
    async def __init__(self, config: LLMConfig, admission: DeploymentHandle, drain_timeout_s: float) -> None:
        process_priority.restore_for_process("LLMServer")  # warns if its vLLM server cannot run at nice 0
        started = time.monotonic()
        host = ray.util.get_node_ip_address()
        port = _free_port(host)
        self.url = f"http://{host}:{port}"
        argv = self.server_command(config, host, port)
        logger.info("starting the engine's server: %s", " ".join(argv))
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await self._wait_ready(config.startup_timeout_s)
        except BaseException:
            self._stop()
            await self.session.close()
            raise
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.admission = AdmissionClient(admission)
        self.max_ongoing = config.autoscaling.max_ongoing_requests
        self.drain_timeout_s = drain_timeout_s
        self.leaving = False
        await self.admission.register_replica(self.replica_id, self.url, self.max_ongoing)
        logger.info("LLMServer for %s ready at %s in %.1fs", config.model_id, self.url, time.monotonic() - started)

    def server_command(self, config: LLMConfig, host: str, port: int) -> list[str]:
        """`vllm serve` for this replica, checked first: a bad option or an unsupported vLLM fails here, with
        vLLM's own message. A benchmark harness may start another OpenAI server here (scripts/relay_ceiling.py)."""
        vllm_compat.check_version()
        model_path = resolve_model_source(config.model_source)
        options = config.engine_options()
        parse_serve_args(model_path, config.model_id, options)
        return vllm_compat.server_command() + serve_argv(model_path, config.model_id, options, host, port)

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineExited(f"vLLM's server exited with code {self.process.returncode} while starting")
            if await answers_health(self.session, self.url):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM's server did not answer /health within {timeout_s:.0f}s")

    # ---- Ray Serve hooks -----------------------------------------------------------------------

    async def check_health(self) -> None:
        if self.process.poll() is not None:
            raise EngineExited(f"vLLM's server exited with code {self.process.returncode}")
        status = await health_status(self.session, self.url)
        if status is None:
            raise EngineExited(f"vLLM's server does not answer /health at {self.url}")
        if status != 200:
            raise EngineExited(f"vLLM's server answers /health with {status}")
        if not self.leaving:  # healthy: make sure Admission dispatches here (it may have restarted)
            try:
                await asyncio.wait_for(self.admission.ensure_replica(self.replica_id, self.url, self.max_ongoing), 10)
            except Exception as exc:  # Admission restarting is no fault of this replica's: the next check tries again
                logger.warning("registering with Admission failed (%s); trying again at the next check", exc)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """What `serve_app.policy.autoscaling` scales on: requests running here, and the gateway's queue."""
        load = await self.admission.replica_load(self.replica_id)
        return {"ongoing": float(load["in_flight"]), "queued": float(load["queued"])}

    async def __del__(self) -> None:
        """On downscale or shutdown: take no new request, let those running here finish (for up to
        `drain_timeout_s`), then leave the Admission pool and stop the engine. Also runs on a replica
        stopped while still starting, which has only its server process."""
        self.leaving = True
        try:
            if hasattr(self, "replica_id"):  # registered with Admission
                await self._drain()
        finally:
            if hasattr(self, "process"):
                self._stop()
            if hasattr(self, "session"):
                await self.session.close()

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        running = 1
        self._engine_idle_since: float | None = None
        while running and time.monotonic() < deadline:
            try:
                running = await asyncio.wait_for(self._running(), timeout=15)
            except asyncio.TimeoutError:  # the engine does not answer: it finishes nothing more
                running = 0
            if running:
                await asyncio.sleep(0.2)
        if running:
            logger.warning("stopping with requests unfinished after %.0fs of draining", self.drain_timeout_s)
        try:
            await asyncio.wait_for(self.admission.deregister_replica(self.replica_id), timeout=5)
        except Exception:
            pass

    async def _running(self) -> int:
        """Requests still to finish here: the slots Admission granted on this replica (some may not have
        reached the engine yet), or the engine's own count when that is higher or Admission is gone.
        Asks Admission to drain it each time: a health check in flight may have registered it again."""
        try:
            await self.check_health()
        except Exception:  # a failed engine finishes nothing: stop it now, so the restart comes sooner
            return 0
        granted = 0
        try:  # bounded: when the whole app stops, Admission may be stopping too and never answer
            granted = await asyncio.wait_for(self.admission.drain_replica(self.replica_id), timeout=2)
        except Exception:  # Admission is gone too: the engine's own count still tells
            pass
        try:
            unfinished = await self.num_unfinished()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0
        # A grant reaches the engine within milliseconds. Slots Admission still counts while the engine has run
        # nothing for ENGINE_IDLE_S are releases that never came (their Router stopped or died first), which
        # would hold the engine, and its GPU, for the whole drain timeout.
        now = time.monotonic()
        if unfinished:
            self._engine_idle_since = None
        elif self._engine_idle_since is None:
            self._engine_idle_since = now
        if granted and self._engine_idle_since is not None and now - self._engine_idle_since >= ENGINE_IDLE_S:
            return 0
        return max(granted, unfinished)

    def _stop(self) -> None:
        """SIGTERM lets vLLM's server stop its engine; its process group (engine core included) is killed
        if it has not finished in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # ---- control calls (Ray handle) -------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/v1/models") as response:
            return await response.json()

    async def num_unfinished(self) -> int:
        """Requests the engine holds, from vLLM's own gauges; the tests use it to see that aborts reach it."""
        async with self.session.get(f"{self.url}/metrics") as response:
            return vllm_compat.unfinished_requests(await response.text())


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the replica process dies, however it dies. A SIGTERM,
    not a SIGKILL: vLLM's server then stops its engine-core process, which a SIGKILL would leave orphaned
    and holding the GPU (seen on CPU). Its own process group lets `_stop` kill server and engine together.
    It runs at nice 0, as bare vLLM does, where it may (`process_priority`)."""
    process_priority.restore_in_child()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()


LLMDeployment = serve.deployment(LLMServer, name="LLMServer", logging_config=NO_ACCESS_LOG)
