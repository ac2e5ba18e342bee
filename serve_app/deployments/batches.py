"""The Batch API's deployment: files and batches (kept by a `BatchStore`), and the runner that sends batch lines
through Admission in the batch class, below low, so that they fill only the capacity interactive traffic leaves.

One replica, on the head node, next to its store. It dispatches through a Router of its own (no HTTP port), so
a batch line is placed, counted and preempted like any request. On start it takes up every batch that was not
finished: lines already answered are not run again."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.batch import lines as fmt
from serve_app.batch.fair_share import next_batches
from serve_app.batch.store import DONE, FAILED, SqliteBatchStore
from serve_app.config import NO_ACCESS_LOG, ON_HEAD_NODE, SINGLE_LOOP_ENV, AppArgs
from serve_app.deployments.admission_client import AdmissionClient
from serve_app.deployments.router import Router
from serve_app.errors import GatewayError, file_too_large

logger = logging.getLogger("ray.serve")

DEFAULT_DIRECTORY = "~/.cache/serve-app/batches"  # then the app's name: apps on one machine keep apart
TICK_S = 0.2  # how often the runner looks for lines to start and batches to finish
RETRY_S = 1.0  # a line refused for load (429, 503) waits at least this long before it queues again


class Batches:
    """Files and batches by owner (an API key's name; "" without keys): `admin` sees everyone's."""

    def __init__(self, router: Router, args: AppArgs, directory: str) -> None:
        self.router = router
        self.config = args.batch
        self.store = SqliteBatchStore(directory)
        self._running: dict[tuple[str, int], asyncio.Task] = {}  # (batch id, line number) -> its task
        self._not_before: dict[tuple[str, int], float] = {}  # lines refused for load, and when to try again
        self.outcomes: Counter[str] = Counter()  # batch lines by outcome, for /v1/stats
        self.output_tokens = 0
        self._loop = asyncio.ensure_future(self._run())

    # ---- files ---------------------------------------------------------------------------------

    async def create_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise GatewayError(400, f"purpose must be 'batch', not {purpose!r}", param="purpose")
        if len(data) > self.config.max_file_bytes:
            raise file_too_large(len(data), self.config.max_file_bytes)
        file = fmt.file_object(fmt.new_id("file"), len(data), int(time.time()), filename, purpose)
        await asyncio.to_thread(self.store.add_file, file, owner, data)
        return file

    async def get_file(self, owner: str, admin: bool, file_id: str) -> dict[str, Any]:
        return self._file(owner, admin, file_id)

    async def file_content(self, owner: str, admin: bool, file_id: str) -> bytes:
        self._file(owner, admin, file_id)
        return await asyncio.to_thread(self.store.file_bytes, file_id)

    async def delete_file(self, owner: str, admin: bool, file_id: str) -> dict[str, Any]:
        self._file(owner, admin, file_id)
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(self, owner: str, admin: bool) -> dict[str, Any]:
        return {"object": "list", "data": self.store.files(None if admin else owner), "has_more": False}

    def _file(self, owner: str, admin: bool, file_id: str) -> dict[str, Any]:
        found = self.store.file(file_id)
        if found is None or not (admin or found[1] == owner):
            raise GatewayError(404, f"no file {file_id!r}", param="file_id")
        return found[0]

    # ---- batches -------------------------------------------------------------------------------

    async def create_batch(
        self, owner: str, input_file_id: str, endpoint: str, window: str, metadata: dict[str, str] | None
    ) -> dict[str, Any]:
        if endpoint not in fmt.ENDPOINTS:
            raise GatewayError(400, f"endpoint must be one of {', '.join(fmt.ENDPOINTS)}", param="endpoint")
        if window not in fmt.COMPLETION_WINDOWS:
            raise GatewayError(400, "completion_window must be '24h'", param="completion_window")
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise GatewayError(400, "metadata must be an object of strings", param="metadata")
        found = self.store.file(input_file_id) if isinstance(input_file_id, str) else None
        if found is None or found[1] != owner:
            raise GatewayError(404, f"no file {input_file_id!r}", param="input_file_id")
        if found[0]["purpose"] != "batch":
            raise GatewayError(400, "the input file's purpose must be 'batch'", param="input_file_id")
        batch = fmt.batch_object(fmt.new_id("batch"), endpoint, input_file_id, window, int(time.time()), metadata)
        self.store.add_batch(batch, owner)
        logger.info("batch %s created from %s (%s)", batch["id"], input_file_id, endpoint)
        return batch

    async def get_batch(self, owner: str, admin: bool, batch_id: str) -> dict[str, Any]:
        return self._batch(owner, admin, batch_id)

    async def list_batches(self, owner: str, admin: bool, after: str | None, limit: int) -> dict[str, Any]:
        found = [b for b, _ in self.store.batches(None if admin else owner)]
        if after is not None:
            ids = [b["id"] for b in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        page = found[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(found) > limit,
        }

    async def cancel_batch(self, owner: str, admin: bool, batch_id: str) -> dict[str, Any]:
        """No new line starts at once; the lines running are cut (their slots given back), then the batch ends
        `cancelled` with what was answered."""
        batch = self._batch(owner, admin, batch_id)
        if batch["status"] in fmt.FINAL or batch["status"] == fmt.CANCELLING:
            if batch["status"] in (fmt.CANCELLING, fmt.CANCELLED):
                return batch
            raise GatewayError(409, f"batch {batch_id} is already {batch['status']}", param="batch_id")
        batch = self.store.update_batch(batch_id, status=fmt.CANCELLING, cancelling_at=int(time.time()))
        self._cut(batch_id)
        return batch

    def _batch(self, owner: str, admin: bool, batch_id: str) -> dict[str, Any]:
        found = self.store.batch(batch_id)
        if found is None or not (admin or found[1] == owner):
            raise GatewayError(404, f"no batch {batch_id!r}", param="batch_id")
        return found[0]

    async def stats(self) -> dict[str, Any]:
        active = self.store.batches(None, (fmt.VALIDATING, fmt.IN_PROGRESS, fmt.FINALIZING, fmt.CANCELLING))
        return {
            "batches_active": len(active),
            "batch_lines_running": len(self._running),  # queued in Admission or holding a slot
            "batch_lines_granted": self.router.holding_slots,  # holding a slot
            "batch_lines": dict(self.outcomes),
            "batch_output_tokens": self.output_tokens,
        }

    # ---- the runner ----------------------------------------------------------------------------

    async def _run(self) -> None:
        waited = False
        while not self.store.claim_runner():
            if not waited:
                logger.warning("another runner holds %s; this one waits for it to stop", self.store.directory)
                waited = True
            await asyncio.sleep(2)
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the batch runner's step failed; it goes on")
            await asyncio.sleep(TICK_S)

    async def _step(self) -> None:
        now = time.time()
        for batch, _ in self.store.batches(None, (fmt.VALIDATING,)):
            await self._validate(batch)
        for batch, _ in self.store.batches(None, (fmt.CANCELLING,)):
            self._cut(batch["id"])
            self.store.fail_pending(batch["id"], {"code": "batch_cancelled", "message": "the batch was cancelled"})
            if not self._running_in(batch["id"]):
                self._finalize(batch, fmt.CANCELLED)
        active = []
        for batch, owner in reversed(self.store.batches(None, (fmt.IN_PROGRESS, fmt.FINALIZING))):
            if batch["expires_at"] <= now:
                self._cut(batch["id"])
                self.store.fail_pending(batch["id"], {"code": "batch_expired", "message": "the batch expired"})
                self._finalize(batch, fmt.EXPIRED)
                continue
            counts = self.store.counts(batch["id"])
            if counts["completed"] + counts["failed"] == counts["total"] and not self._running_in(batch["id"]):
                self._finalize(batch, fmt.COMPLETED)
                continue
            if counts != batch["request_counts"]:  # progress, as `batches.retrieve` shows it
                self.store.update_batch(batch["id"], request_counts=counts)
            active.append((batch, owner))
        self._start_lines(active)

    async def _validate(self, batch: dict[str, Any]) -> None:
        try:
            data = await asyncio.to_thread(self.store.file_bytes, batch["input_file_id"])
            parsed = fmt.parse_input(data, batch["endpoint"])
        except (OSError, fmt.BatchInputError) as exc:
            code = getattr(exc, "code", "invalid_file")
            message = str(exc) if isinstance(exc, fmt.BatchInputError) else "the input file is gone"
            errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
            self.store.update_batch(batch["id"], status=fmt.FAILED, failed_at=int(time.time()), errors=errors)
            logger.info("batch %s failed validation: %s", batch["id"], message)
            return
        await asyncio.to_thread(self.store.add_lines, batch["id"], parsed)
        counts = self.store.counts(batch["id"])
        self.store.update_batch(
            batch["id"], status=fmt.IN_PROGRESS, in_progress_at=int(time.time()), request_counts=counts
        )
        logger.info("batch %s in progress: %d lines (%d bad)", batch["id"], counts["total"], counts["failed"])

    def _start_lines(self, active: list[tuple[dict[str, Any], str]]) -> None:
        free = self.config.max_in_flight - len(self._running)
        if free <= 0 or not active:
            return
        now = time.monotonic()
        running = Counter(batch_id for batch_id, _ in self._running)
        owners = {batch["id"]: owner for batch, owner in active}
        endpoints = {batch["id"]: batch["endpoint"] for batch, _ in active}
        wanted = Counter(next_batches([(b["id"], o) for b, o in active], running, free))
        for batch_id, n in wanted.items():
            skip = {number for (b, number) in self._running if b == batch_id}
            skip |= {number for (b, number), at in self._not_before.items() if b == batch_id and at > now}
            for number, custom_id, body in self.store.pending(batch_id, n, skip):
                key = (batch_id, number)
                self._not_before.pop(key, None)
                self._running[key] = asyncio.ensure_future(
                    self._line(batch_id, owners[batch_id], endpoints[batch_id], number, custom_id, body)
                )

    async def _line(
        self, batch_id: str, owner: str, endpoint: str, number: int, custom_id: str, body: dict[str, Any]
    ) -> None:
        key = (batch_id, number)
        try:
            status, answer, request_id = await self.router.answer_line(fmt.ENDPOINTS[endpoint], body, owner)
        except GatewayError as exc:
            if exc.status in (429, 503):  # load or recovery: the line stays pending and queues again later
                self.outcomes[f"deferred_{exc.kind}"] += 1
                self._not_before[key] = time.monotonic() + max(RETRY_S, exc.retry_after_s or 0)
                return
            status, answer, request_id = exc.status, exc.body(), ""
        except asyncio.CancelledError:
            return  # cut by a cancel, an expiry or a preemption: a preempted line stays pending
        except Exception:
            logger.exception("batch %s line %d failed in the gateway", batch_id, number)
            status, answer, request_id = 500, GatewayError(500, "internal error in the gateway").body(), ""
        finally:
            self._running.pop(key, None)
        state = DONE if status == 200 else FAILED
        self.outcomes["completed" if state == DONE else f"failed_{status}"] += 1
        if state == DONE and isinstance(answer, dict):
            self.output_tokens += (answer.get("usage") or {}).get("completion_tokens") or 0
        result = {"status_code": status, "body": answer, "request_id": request_id}
        self.store.finish_line(batch_id, number, state, result)

    def _running_in(self, batch_id: str) -> bool:
        return any(b == batch_id for b, _ in self._running)

    def _cut(self, batch_id: str) -> None:
        """Its running lines end now: each gives its slot back and the engine aborts it."""
        for (b, _), task in list(self._running.items()):
            if b == batch_id:
                task.cancel()

    def _finalize(self, batch: dict[str, Any], status: str) -> None:
        """Writes the output and error files from the store (each line once, in input order) and ends it."""
        batch_id = batch["id"]
        stamp = int(time.time())
        self.store.update_batch(batch_id, status=fmt.FINALIZING, finalizing_at=batch.get("finalizing_at") or stamp)
        files = {}
        for state, purpose in ((DONE, "output"), (FAILED, "error")):
            out = []
            for row in self.store.results(batch_id, state):
                result = row["result"]
                if "error" in result:
                    out.append(fmt.error_line(row["custom_id"], result["error"]))
                else:
                    out.append(
                        fmt.output_line(row["custom_id"], result["status_code"], result["body"], result["request_id"])
                    )
            if out:
                data = "".join(json.dumps(line) + "\n" for line in out).encode()
                file = fmt.file_object(
                    fmt.new_id("file"), len(data), stamp, f"{batch_id}_{purpose}.jsonl", "batch_output"
                )
                owner = self.store.batch(batch_id)[1]
                self.store.add_file(file, owner, data)
                files[f"{purpose}_file_id"] = file["id"]
        counts = self.store.counts(batch_id)
        ended = {fmt.COMPLETED: "completed_at", fmt.CANCELLED: "cancelled_at", fmt.EXPIRED: "expired_at"}[status]
        self.store.update_batch(batch_id, status=status, request_counts=counts, **files, **{ended: stamp})
        logger.info("batch %s %s: %s", batch_id, status, counts)

    async def close(self) -> None:
        self._loop.cancel()
        for task in self._running.values():
            task.cancel()
        await asyncio.gather(self._loop, *self._running.values(), return_exceptions=True)
        await self.router.close()
        self.store.close()


class BatchesReplica(Batches):
    """The deployment: the runner's Router has no port of its own; Routers forward the API's calls here."""

    def __init__(
        self, admission: DeploymentHandle, llm: DeploymentHandle, metrics: DeploymentHandle, args: AppArgs
    ) -> None:
        app = serve.get_replica_context().app_name
        directory = args.batch.directory or os.path.join(DEFAULT_DIRECTORY, app)
        super().__init__(Router(AdmissionClient(admission), llm, metrics, args), args, directory)

    async def __del__(self) -> None:
        await self.close()


BatchesDeployment = serve.deployment(
    BatchesReplica,
    name="Batches",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0, "resources": ON_HEAD_NODE, "runtime_env": {"env_vars": SINGLE_LOOP_ENV}},
    max_ongoing_requests=10_000,
    logging_config=NO_ACCESS_LOG,
)
