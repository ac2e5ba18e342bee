"""Where batches and their files live, so that nothing is lost when the gateway stops or is killed: the state of
every batch and line in SQLite, each file's bytes in a directory. `BatchStore` is the interface the runner and the
API use; another backend (an object store for the files) implements the same methods.

A file is written to a temporary name and renamed, then recorded: a crash never leaves half a file behind a
record. A line's answer is committed once; the output is built from those rows, so each `custom_id` appears once
however often the gateway restarts."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from serve_app.batch.lines import Line

# A line's state. Its result: {"status_code", "body", "request_id"} for an answer (DONE: 200, in the output file;
# FAILED: an error status, in the error file), or {"error": {"code", "message"}} for a line that never ran.
PENDING, DONE, FAILED = "pending", "done", "failed"


class BatchStore(Protocol):
    def claim_runner(self) -> bool: ...
    def add_file(self, file: dict[str, Any], owner: str, data: bytes) -> None: ...
    def file(self, file_id: str) -> tuple[dict[str, Any], str] | None: ...
    def file_bytes(self, file_id: str) -> bytes: ...
    def delete_file(self, file_id: str) -> bool: ...
    def files(self, owner: str | None) -> list[dict[str, Any]]: ...
    def add_batch(self, batch: dict[str, Any], owner: str) -> None: ...
    def add_lines(self, batch_id: str, lines: list[Line]) -> None: ...
    def batch(self, batch_id: str) -> tuple[dict[str, Any], str] | None: ...
    def batches(self, owner: str | None, statuses: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]: ...
    def update_batch(self, batch_id: str, **fields: Any) -> dict[str, Any]: ...
    def pending(self, batch_id: str, limit: int, skip: set[int]) -> list[tuple[int, str, dict[str, Any]]]: ...
    def finish_line(self, batch_id: str, number: int, state: str, result: dict[str, Any]) -> None: ...
    def fail_pending(self, batch_id: str, error: dict[str, str]) -> int: ...
    def counts(self, batch_id: str) -> dict[str, int]: ...
    def results(self, batch_id: str, state: str) -> Iterator[dict[str, Any]]: ...


class SqliteBatchStore:
    """The embedded default: one SQLite file (WAL, so that readers never wait for the runner) and a folder."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(os.path.expanduser(directory))
        self.files_dir = os.path.join(self.directory, "files")
        os.makedirs(self.files_dir, exist_ok=True)
        self._db = sqlite3.connect(os.path.join(self.directory, "batches.sqlite3"), check_same_thread=False)
        self._lock = threading.Lock()  # one connection, used from the event loop and from worker threads
        self._runner_lock: int | None = None
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS files (id TEXT PRIMARY KEY, owner TEXT, doc TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS batches (id TEXT PRIMARY KEY, owner TEXT, status TEXT, doc TEXT)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS lines (batch_id TEXT, number INTEGER, custom_id TEXT, request TEXT,"
                " state TEXT, result TEXT, PRIMARY KEY (batch_id, number))"
            )
            db.execute("CREATE INDEX IF NOT EXISTS lines_state ON lines (batch_id, state, number)")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def claim_runner(self) -> bool:
        """Whether this process may run the store's batches: only one runner at a time (a lock the OS drops when
        the process dies), so that two gateways on one folder, or the old and new replica of a redeploy, never
        run a line twice."""
        if self._runner_lock is None:
            fd = os.open(os.path.join(self.directory, "runner.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._runner_lock = fd
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._runner_lock is not None:
            os.close(self._runner_lock)
            self._runner_lock = None

    # ---- files ---------------------------------------------------------------------------------

    def _path(self, file_id: str) -> str:
        if not file_id.replace("_", "").replace("-", "").isalnum():
            raise KeyError(file_id)  # never a path outside the folder
        return os.path.join(self.files_dir, file_id)

    def add_file(self, file: dict[str, Any], owner: str, data: bytes) -> None:
        fd, temporary = tempfile.mkstemp(dir=self.files_dir, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self._path(file["id"]))
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        with self._tx() as db:
            db.execute("INSERT INTO files VALUES (?, ?, ?)", (file["id"], owner, json.dumps(file)))

    def file(self, file_id: str) -> tuple[dict[str, Any], str] | None:
        with self._tx() as db:
            row = db.execute("SELECT doc, owner FROM files WHERE id = ?", (file_id,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def file_bytes(self, file_id: str) -> bytes:
        with open(self._path(file_id), "rb") as f:
            return f.read()

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0
        if gone:
            try:
                os.unlink(self._path(file_id))
            except FileNotFoundError:
                pass
        return gone

    def files(self, owner: str | None) -> list[dict[str, Any]]:
        query, args = "SELECT doc FROM files", ()
        if owner is not None:
            query, args = query + " WHERE owner = ?", (owner,)
        with self._tx() as db:
            rows = db.execute(query, args).fetchall()
        return sorted((json.loads(r[0]) for r in rows), key=lambda f: f["created_at"], reverse=True)

    # ---- batches -------------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any], owner: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?)", (batch["id"], owner, batch["status"], json.dumps(batch))
            )

    def add_lines(self, batch_id: str, lines: list[Line]) -> None:
        """All of a batch's lines in one transaction: a crash while validating leaves none, and validation
        starts again."""
        with self._tx() as db:
            db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
            db.executemany(
                "INSERT INTO lines VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        batch_id,
                        line.number,
                        line.custom_id,
                        None if line.request is None else json.dumps(line.request),
                        PENDING if line.request is not None else FAILED,
                        None if line.error is None else json.dumps({"error": line.error}),
                    )
                    for line in lines
                ],
            )

    def batch(self, batch_id: str) -> tuple[dict[str, Any], str] | None:
        with self._tx() as db:
            row = db.execute("SELECT doc, owner FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def batches(self, owner: str | None, statuses: tuple[str, ...] = ()) -> list[tuple[dict[str, Any], str]]:
        query, args = "SELECT doc, owner FROM batches WHERE 1 = 1", []
        if owner is not None:
            query, args = query + " AND owner = ?", [owner]
        if statuses:
            query += f" AND status IN ({', '.join('?' * len(statuses))})"
            args += list(statuses)
        with self._tx() as db:
            rows = db.execute(query, args).fetchall()
        return sorted(((json.loads(d), o) for d, o in rows), key=lambda b: b[0]["created_at"], reverse=True)

    def update_batch(self, batch_id: str, **fields: Any) -> dict[str, Any]:
        with self._tx() as db:
            row = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None:
                raise KeyError(batch_id)
            doc = {**json.loads(row[0]), **fields}
            db.execute(
                "UPDATE batches SET status = ?, doc = ? WHERE id = ?", (doc["status"], json.dumps(doc), batch_id)
            )
        return doc

    # ---- lines ---------------------------------------------------------------------------------

    def pending(self, batch_id: str, limit: int, skip: set[int]) -> list[tuple[int, str, dict[str, Any]]]:
        """Up to `limit` lines still to run, in file order, past those in `skip` (running now)."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT number, custom_id, request FROM lines WHERE batch_id = ? AND state = ? ORDER BY number LIMIT ?",
                (batch_id, PENDING, limit + len(skip)),
            ).fetchall()
        return [(n, c, json.loads(r)) for n, c, r in rows if n not in skip][:limit]

    def finish_line(self, batch_id: str, number: int, state: str, result: dict[str, Any]) -> None:
        """A line's answer, once: a line already finished keeps its first answer."""
        with self._tx() as db:
            db.execute(
                "UPDATE lines SET state = ?, result = ? WHERE batch_id = ? AND number = ? AND state = ?",
                (state, json.dumps(result), batch_id, number, PENDING),
            )

    def fail_pending(self, batch_id: str, error: dict[str, str]) -> int:
        """Every line not run yet fails with `error` (a cancel, an expiry); returns how many."""
        with self._tx() as db:
            return db.execute(
                "UPDATE lines SET state = ?, result = ? WHERE batch_id = ? AND state = ?",
                (FAILED, json.dumps({"error": error}), batch_id, PENDING),
            ).rowcount

    def counts(self, batch_id: str) -> dict[str, int]:
        with self._tx() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM lines WHERE batch_id = ? GROUP BY state", (batch_id,))
            by_state = dict(rows.fetchall())
        return {
            "total": sum(by_state.values()),
            "completed": by_state.get(DONE, 0),
            "failed": by_state.get(FAILED, 0),
        }

    def results(self, batch_id: str, state: str) -> Iterator[dict[str, Any]]:
        """(number, custom_id, result) of the lines in `state`, in file order, for the output files."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT number, custom_id, result FROM lines WHERE batch_id = ? AND state = ? ORDER BY number",
                (batch_id, state),
            ).fetchall()
        for number, custom_id, result in rows:
            yield {"number": number, "custom_id": custom_id, "result": json.loads(result)}
