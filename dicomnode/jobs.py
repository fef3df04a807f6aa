"""Durable job queue (SQLite) and the worker pool that drains it.

A job is one (study, route, generation): the route's task run on the study's
matching series. States: ``pending -> running -> done``; a failure returns the
job to ``pending`` with exponential backoff until ``max_attempts``, then it is
``dead`` with the reason. Jobs left ``running`` by a killed process go back to
``pending`` on start-up (:meth:`JobQueue.recover`). Workers are plain threads,
never the association threads.

Table owned here: ``jobs``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode import db
from dicomnode.wakeup import Wakeup

log = logging.getLogger(__name__)

__all__ = ["SCHEMA", "Job", "JobQueue", "WorkerPool"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    task TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    series_uids TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    timings TEXT,
    model_version TEXT,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
"""


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table."""

    id: int
    study_uid: str
    route: str
    task: str
    generation: int
    series_uids: tuple[str, ...]
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    created_at: float
    updated_at: float
    timings: dict[str, float] | None
    model_version: str | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> Job:
        """Build from a database row."""
        return cls(r["id"], r["study_uid"], r["route"], r["task"], r["generation"],
                   tuple(json.loads(r["series_uids"])), r["state"], r["attempts"], r["next_attempt_at"],
                   r["last_error"], r["created_at"], r["updated_at"],
                   json.loads(r["timings"]) if r["timings"] else None, r["model_version"])


class JobQueue:
    """The durable queue in ``<storage_dir>/node.db``.

    Parameters
    ----------
    db_path:
        Path of the node database.
    max_attempts:
        Attempts before a job is ``dead``.
    backoff_initial_s, backoff_max_s:
        Retry delay ``initial * 2**(attempts-1)``, capped at ``max``.
    """

    def __init__(self, db_path: Path, *, max_attempts: int = 5, backoff_initial_s: float = 2.0,
                 backoff_max_s: float = 300.0) -> None:
        self.db_path = Path(db_path)
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        conn = db.connect(self.db_path)
        try:
            db.ensure_schema(conn, SCHEMA)
        finally:
            conn.close()

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        return db.thread_connection(self.db_path)

    def enqueue(self, study_uid: str, route: str, task: str, series_uids: list[str], *, generation: int = 1,
                conn: sqlite3.Connection | None = None) -> int | None:
        """Add a job; idempotent per (study, route, generation). Returns the new id, or None if it existed.

        Pass ``conn`` to enqueue inside the caller's open transaction.
        """
        now = time.time()
        cur = (conn or self.conn).execute(
            "INSERT OR IGNORE INTO jobs (study_uid, route, task, generation, series_uids, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?)", (study_uid, route, task, generation, json.dumps(sorted(series_uids)), now, now))
        return int(cur.lastrowid) if cur.rowcount else None

    def claim(self, now: float | None = None) -> Job | None:
        """Atomically take the oldest due pending job and mark it running."""
        now = time.time() if now is None else now
        conn = self.conn
        with db.transaction(conn):
            row = conn.execute("SELECT id FROM jobs WHERE state='pending' AND next_attempt_at<=? ORDER BY id LIMIT 1",
                               (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state='running', attempts=attempts+1, updated_at=? WHERE id=?"
                         " AND state='pending'", (now, row["id"]))
            job = conn.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return Job.from_row(job)

    def mark_done(self, job_id: int, *, timings: dict[str, float] | None = None, model_version: str | None = None,
                  conn: sqlite3.Connection | None = None) -> None:
        """Mark a running job done (inside the caller's transaction when ``conn`` is given)."""
        (conn or self.conn).execute(
            "UPDATE jobs SET state='done', last_error=NULL, updated_at=?, timings=?, model_version=? WHERE id=?",
            (time.time(), json.dumps(timings or {}), model_version, job_id))

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next attempt after ``attempts`` failures."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempts - 1))

    def mark_failed(self, job_id: int, error: str, *, permanent: bool = False) -> str:
        """Record a failure: back to pending with backoff, or ``dead``. Returns the new state."""
        conn = self.conn
        now = time.time()
        with db.transaction(conn):
            row = conn.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return "missing"
            attempts = int(row["attempts"])
            if permanent or attempts >= self.max_attempts:
                state, due = "dead", now
            else:
                state, due = "pending", now + self.backoff_s(attempts)
            conn.execute("UPDATE jobs SET state=?, next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                         (state, due, error[:2000], now, job_id))
        log.warning("job %d failed (attempt %d): %s -> %s", job_id, attempts, error, state)
        return state

    def release(self, job_id: int) -> None:
        """Return a running job to pending without counting the attempt (clean shutdown)."""
        self.conn.execute("UPDATE jobs SET state='pending', attempts=MAX(attempts-1,0), updated_at=? WHERE id=?"
                          " AND state='running'", (time.time(), job_id))

    def recover(self) -> int:
        """Put jobs left ``running`` by a dead process back to ``pending``; returns how many."""
        n = self.conn.execute("UPDATE jobs SET state='pending', updated_at=? WHERE state='running'",
                              (time.time(),)).rowcount
        if n:
            log.info("recovered %d interrupted job(s)", n)
        return n

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, *, study_uid: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs, newest first."""
        sql = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if study_uid is not None:
            sql, args = sql + " WHERE study_uid=?", (study_uid,)
        rows = self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        return {r["state"]: r["n"] for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}


class WorkerPool:
    """Threads that claim jobs and run ``handler(job)``.

    ``handler`` must finish the job itself (call :meth:`JobQueue.mark_done`,
    typically inside its own transaction). An exception marks the job failed;
    exceptions with a true ``permanent`` attribute make it dead at once.
    """

    def __init__(self, queue: JobQueue, handler: Callable[[Job], None], *, n_workers: int = 1,
                 poll_s: float = 0.5) -> None:
        self.queue = queue
        self.handler = handler
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"worker-{i}", daemon=True)
                         for i in range(n_workers)]
        self._current: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wakeup = Wakeup()

    def start(self) -> WorkerPool:
        """Start the threads."""
        for t in self._threads:
            t.start()
        return self

    def wake(self) -> None:
        """A job was enqueued: idle workers claim now instead of at their next poll."""
        self._wakeup.wake()

    def _run(self) -> None:
        name = threading.current_thread().name
        while not self._stop.is_set():
            token = self._wakeup.token()
            try:
                job = self.queue.claim()
            except sqlite3.Error as exc:
                log.error("cannot claim a job: %s", exc)
                self._stop.wait(self.poll_s)
                continue
            if job is None:
                self._wakeup.wait(token, self.poll_s)
                continue
            with self._lock:
                self._current[name] = job.id
            t0 = time.monotonic()
            try:
                self.handler(job)
                log.info("job %d (%s, route %s) done in %.2f s", job.id, job.task, job.route, time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 - any failure of a job is recorded, never kills the worker
                log.debug("job %d failed", job.id, exc_info=True)
                self.queue.mark_failed(job.id, f"{type(exc).__name__}: {exc}",
                                       permanent=bool(getattr(exc, "permanent", False)))
            finally:
                with self._lock:
                    self._current.pop(name, None)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop claiming, wait for in-flight jobs, and return any still running to pending."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._current.values())
        for job_id in left:
            log.warning("job %d still running at shutdown; returned to pending", job_id)
            self.queue.release(job_id)
