"""Chaos soak: a mixed-class load held on the gateway while its parts are killed at random times (issue 19).

The gateway runs on a Ray cluster of two nodes on this machine (`ray.cluster_utils.Cluster`): Routers, Admission
and metrics on the head, the LLMServer replica on a worker node. An open-loop load (Poisson, high 20% / medium
30% / low 50%, half of it streamed) runs for --minutes. Meanwhile, one fault at a time, after the gateway has
recovered from the last and a random pause, one of:

    router     SIGKILL of one of the two Router replicas
    admission  SIGKILL of the Admission actor
    replica    SIGKILL of the LLMServer replica
    engine     SIGKILL of vLLM's engine core
    node       the worker node removed (its processes killed), then added back

Reported (JSON with --out, and a table): requests sent, and how each ended (whole answers; streams cut with an
error event; 429 and 503 with Retry-After; broken connections, expected only from a killed Router; other
statuses); requests lost (no answer within --timeout, or an answer a client cannot act on: must be 0); slots
leaked once the load has stopped (must be 0); and each fault's recovery time (from the kill until the gateway
answers a high request again and the part is back).

    .venv/bin/python scripts/chaos_soak.py --minutes 30 --out chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

import httpx
import psutil

APP = "chaos"
MODEL_ID = "smollm2-135m-instruct"
FAULTS = ("router", "admission", "replica", "engine", "node")
MIX = (("high", 0.2), ("medium", 0.3), ("low", 0.5))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_config(port: int) -> dict[str, Any]:
    return {
        "llm": {
            "engine_kwargs": {"max_model_len": 2048, "max_num_seqs": 16},
            "resources": {"llm_node": 1},
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 1,
                "target_ongoing_requests": 4,
                "max_ongoing_requests": 8,
            },
        },
        "queue": {
            "high": {"max_queue_len": 64, "max_wait_s": 120},
            "medium": {"max_queue_len": 64, "max_wait_s": 120},
            "low": {"max_queue_len": 64, "max_wait_s": 240},
        },
        "http": {"host": "127.0.0.1", "port": port},
        "router": {"num_replicas": 2, "resources": {"node:__internal_head__": 0.001}},  # a node's loss spares them
        "replica_check_s": 1.0,
        "admission": {"router_lease_s": 10},
        "drain_timeout_s": 10,
    }


def processes(marker: str, raylets: set[int] | None = None) -> list[psutil.Process]:
    """Processes whose command line has `marker`; with `raylets`, only the workers of those raylets (another Ray
    on the machine, such as the test suite's, has an AdmissionActor too)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and (raylets is None or proc.info["ppid"] in raylets):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def engine_cores() -> list[psutil.Process]:
    cores = []
    for replica in processes(f"ServeReplica:{APP}:LLMServer"):
        try:
            cores += [
                p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline() or [p.name()])
            ]
        except psutil.Error:
            continue
    return cores


class Load:
    """The open-loop load, and how each request ended."""

    def __init__(self, base: str, rate: float, timeout_s: float, rng: random.Random) -> None:
        self.base, self.rate, self.timeout_s, self.rng = base, rate, timeout_s, rng
        self.ended: Counter[str] = Counter()
        self.by_class: dict[str, Counter[str]] = {label: Counter() for label, _ in MIX}
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, until: float) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # one connection per request
        async with httpx.AsyncClient(base_url=self.base, timeout=self.timeout_s, limits=limits) as client:
            while time.monotonic() < until:
                await asyncio.sleep(self.rng.expovariate(self.rate))
                label = self.rng.choices([c for c, _ in MIX], [w for _, w in MIX])[0]
                task = asyncio.ensure_future(self.one(client, label, self.rng.random() < 0.5, self.rng.randint(8, 64)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            if self.tasks:
                await asyncio.wait(set(self.tasks))

    async def one(self, client: httpx.AsyncClient, label: str, stream: bool, max_tokens: int) -> None:
        self.sent += 1
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": f"Count to {max_tokens}."}],
            "max_tokens": max_tokens,
            "stream": stream,
        }
        try:
            outcome = await asyncio.wait_for(self._send(client, label, body), self.timeout_s + 5)
        except asyncio.TimeoutError:
            outcome = "lost: no answer"
        except (httpx.TransportError, OSError):
            outcome = "broken connection"
        self.ended[outcome] += 1
        self.by_class[label][outcome] += 1

    async def _send(self, client: httpx.AsyncClient, label: str, body: dict[str, Any]) -> str:
        headers = {"X-Priority": label}
        if not body["stream"]:
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            return _status_outcome(response) or ("ok" if "choices" in response.json() else "lost: unreadable")
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            if (outcome := _status_outcome(response, streamed=True)) is not None:
                await response.aread()
                return outcome
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        if not events or events[-1] != "[DONE]":
            return "lost: stream without [DONE]"
        return "stream cut (error event)" if any('"error"' in e for e in events[:-1]) else "ok"


def _status_outcome(response: httpx.Response, streamed: bool = False) -> str | None:
    if response.status_code == 200:
        return None
    if response.status_code in (429, 503):
        return f"{response.status_code} with Retry-After" if response.headers.get("retry-after") else "no Retry-After"
    return f"status {response.status_code}"


async def healthy(client: httpx.AsyncClient) -> bool:
    """The gateway answers a high request."""
    try:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"X-Priority": "high"},
            timeout=30,
        )
        return response.status_code == 200
    except httpx.HTTPError:
        return False


class Gateway:
    def __init__(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from serve_app.app import build_app

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 4, "include_dashboard": False, "gcs_server_port": free_port()},
        )
        self.worker = self.cluster.add_node(num_cpus=2, resources={"llm_node": 1})
        ray.init(address=self.cluster.address, namespace="serve", log_to_driver=False)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        serve.start(proxy_location="Disabled")
        serve.run(build_app(app_config(self.port)), name=APP, route_prefix="/", blocking=False)

    async def stats(self, client: httpx.AsyncClient) -> dict[str, Any]:
        return (await client.get("/v1/stats", timeout=30)).json()

    def inject(self, fault: str) -> str:
        """Kills the part; returns what was killed."""
        if fault == "node":
            self.cluster.remove_node(self.worker, allow_graceful=False)
            time.sleep(5)
            self.worker = self.cluster.add_node(num_cpus=2, resources={"llm_node": 1})
            return "worker node"
        victims = {
            "router": lambda: processes(f"ServeReplica:{APP}:Router"),
            "admission": lambda: processes("ray::AdmissionActor", self.raylets()),
            "replica": lambda: processes(f"ServeReplica:{APP}:LLMServer"),
            "engine": engine_cores,
        }[fault]()
        if not victims:
            return "nothing to kill"
        victim = random.choice(victims)
        victim.send_signal(signal.SIGKILL)
        return f"pid {victim.pid}"

    def raylets(self) -> set[int]:
        """The pids of this cluster's raylets: its workers' parent."""
        return {
            info.process.pid
            for node in self.cluster.list_all_nodes()
            for info in node.all_processes.get("raylet", [])
            if info.process is not None
        }

    def back(self, fault: str, state: dict[str, Any], before: dict[str, Any]) -> bool:
        """The part killed is back (besides the gateway answering); `before` is the state before the kill."""
        router = state.get("router", {})
        if fault == "router":
            return len(processes(f"ServeReplica:{APP}:Router")) == 2
        if fault == "admission":  # a new Admission (restarted in place, or replaced) is in charge
            was = before.get("router", {}).get("incarnation")
            return router.get("incarnation") not in (None, was) and router.get("replicas") == 1
        return router.get("replicas") == 1 and bool(engine_cores())

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    gateway = Gateway()
    report: dict[str, Any] = {"minutes": args.minutes, "rate": args.rate, "faults": []}
    try:
        async with httpx.AsyncClient(base_url=gateway.base, timeout=60) as client:
            started = time.monotonic()
            while not await healthy(client):
                assert time.monotonic() - started < 900, "the gateway did not start"
                await asyncio.sleep(2)
            print(f"gateway serving after {time.monotonic() - started:.0f} s; load for {args.minutes} min", flush=True)
            load = Load(gateway.base, args.rate, args.timeout, rng)
            until = time.monotonic() + args.minutes * 60
            running = asyncio.ensure_future(load.run(until))
            kinds = list(args.faults)
            while time.monotonic() < until - args.gap_s:
                await asyncio.sleep(args.gap_s * rng.uniform(0.5, 1.5))
                fault = kinds.pop(0) if kinds else rng.choice(args.faults)  # each kind once, then at random
                try:
                    before = await gateway.stats(client)
                except (httpx.HTTPError, ValueError):
                    before = {}
                killed_at = time.monotonic()
                what = gateway.inject(fault)
                recovered_s = None
                while time.monotonic() - killed_at < args.recovery_timeout:
                    await asyncio.sleep(0.5)
                    try:
                        state = await gateway.stats(client)
                    except (httpx.HTTPError, ValueError):
                        continue
                    if gateway.back(fault, state, before) and await healthy(client):
                        recovered_s = round(time.monotonic() - killed_at, 1)
                        break
                entry = {"fault": fault, "killed": what, "at_s": round(killed_at - (until - args.minutes * 60), 1)}
                report["faults"].append({**entry, "recovered_s": recovered_s})
                print(
                    f"{fault} ({what}) at {entry['at_s']} s: recovered in {recovered_s} s; so far {dict(load.ended)}",
                    flush=True,
                )
            await running
            settled = time.monotonic()
            while True:  # every request has ended: what Admission and vLLM still count is leaked
                state = (await gateway.stats(client))["router"]
                queued = sum(state.get(f"queued_{label}", 0) for label, _ in MIX)
                if (state["in_flight"] == 0 and queued == 0) or time.monotonic() - settled > 120:
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(3)  # vLLM's own count, as of a replica check after the last request ended
            state = (await gateway.stats(client))["router"]
            engine_running = [r.get("engine_running") for r in state.get("replica_detail", [])]
        report.update(
            sent=load.sent,
            ended=dict(load.ended),
            by_class={label: dict(counts) for label, counts in load.by_class.items()},
            lost=sum(
                n for outcome, n in load.ended.items() if outcome.startswith("lost") or outcome == "no Retry-After"
            ),
            other_status=sum(n for outcome, n in load.ended.items() if outcome.startswith("status")),
            leaked_slots=state["in_flight"],
            leaked_queued=queued,
            engine_running_after=engine_running,
            admission={
                k: state.get(k) for k in ("restarted", "rejoined_routers", "reclaimed_routers", "reclaimed_slots")
            },
        )
    finally:
        gateway.close()
    return report


def table(report: dict[str, Any]) -> str:
    lines = ["| outcome | requests |", "|---|---|"]
    lines += [f"| {outcome} | {n} |" for outcome, n in sorted(report["ended"].items(), key=lambda kv: -kv[1])]
    lines += [
        f"| **sent** | {report['sent']} |",
        f"| **lost** | {report['lost']} |",
        f"| **slots leaked** | {report['leaked_slots']} |",
    ]
    lines += ["", "| fault | at (s) | killed | recovered in (s) |", "|---|---|---|---|"]
    lines += [f"| {f['fault']} | {f['at_s']} | {f['killed']} | {f['recovered_s']} |" for f in report["faults"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second, open loop")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--gap-s", type=float, default=60, help="mean pause between a recovery and the next fault")
    parser.add_argument("--recovery-timeout", type=float, default=600)
    parser.add_argument("--timeout", type=float, default=600, help="a request not answered by then is lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the report as JSON")
    args = parser.parse_args()
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    os.environ.pop("RAY_ADDRESS", None)
    report = asyncio.run(soak(args))
    print(table(report))
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as out:
            json.dump(report, out, indent=1)
    sys.exit(0 if report["lost"] == 0 and report["leaked_slots"] == 0 else 1)


if __name__ == "__main__":
    main()
