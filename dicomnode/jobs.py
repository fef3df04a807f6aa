"""Durable job queue (SQLite) and the worker pool that drains it.

A job is one (study, route, generation): the route's task run on the study's
matching series. States: ``pending -> running -> done``; a failure returns the
job to ``pending`` with exponential backoff until ``max_attempts``, then it is
``dead`` with the reason. Jobs left ``running`` by a killed process go back to
``pending`` on start-up (:meth:`JobQueue.recover`). Workers are plain threads,
never the association threads.

Its table, ``jobs``, is written only through :class:`dicomnode.store.JobsRepo`.
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

from dicomnode import store
from dicomnode.store import JobsRepo
from dicomnode.wakeup import Wakeup

log = logging.getLogger(__name__)

__all__ = ["Job", "JobQueue", "WorkerPool"]

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
        store.ensure(self.db_path)

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        return store.thread_connection(self.db_path)

    def enqueue(self, study_uid: str, route: str, task: str, series_uids: list[str], *, generation: int = 1,
                conn: sqlite3.Connection | None = None) -> int | None:
        """Add a job; idempotent per (study, route, generation). Returns the new id, or None if it existed.

        Pass ``conn`` to enqueue inside the caller's open transaction.
        """
        return JobsRepo(conn or self.conn).enqueue(study_uid, route, task, series_uids, generation)

    def claim(self, now: float | None = None) -> Job | None:
        """Atomically take the oldest due pending job and mark it running."""
        now = time.time() if now is None else now
        conn = self.conn
        repo = JobsRepo(conn)
        with store.transaction(conn):
            job_id = repo.next_due(now)
            if job_id is None:
                return None
            repo.mark_running(job_id, now)
            row = repo.get(job_id)
        assert row is not None
        return Job.from_row(row)

    def mark_done(self, job_id: int, *, timings: dict[str, float] | None = None, model_version: str | None = None,
                  conn: sqlite3.Connection | None = None) -> None:
        """Mark a running job done (inside the caller's transaction when ``conn`` is given)."""
        JobsRepo(conn or self.conn).mark_done(job_id, timings, model_version)

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next attempt after ``attempts`` failures."""
        return min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempts - 1))

    def mark_failed(self, job_id: int, error: str, *, permanent: bool = False) -> str:
        """Record a failure: back to pending with backoff, or ``dead``. Returns the new state."""
        conn = self.conn
        now = time.time()
        repo = JobsRepo(conn)
        with store.transaction(conn):
            row = repo.get(job_id)
            if row is None:
                return "missing"
            attempts = int(row["attempts"])
            if permanent or attempts >= self.max_attempts:
                state, due = "dead", now
            else:
                state, due = "pending", now + self.backoff_s(attempts)
            repo.set_failed(job_id, state, due, error, now)
        log.warning("job %d failed (attempt %d): %s -> %s", job_id, attempts, error, state)
        return state

    def release(self, job_id: int) -> None:
        """Return a running job to pending without counting the attempt (clean shutdown)."""
        JobsRepo(self.conn).release(job_id)

    def recover(self) -> int:
        """Put jobs left ``running`` by a dead process back to ``pending``; returns how many."""
        n = JobsRepo(self.conn).recover()
        if n:
            log.info("recovered %d interrupted job(s)", n)
        return n

    def get(self, job_id: int) -> Job | None:
        """One job by id."""
        row = JobsRepo(self.conn).get(job_id)
        return Job.from_row(row) if row else None

    def list(self, *, study_uid: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs, newest first."""
        return [Job.from_row(r) for r in JobsRepo(self.conn).rows(study_uid, limit)]

    def counts(self) -> dict[str, int]:
        """Number of jobs per state."""
        return JobsRepo(self.conn).counts()


class WorkerPool:
    """Threads that claim jobs and run ``handler(job)``.

    ``handler`` must finish the job itself (call :meth:`JobQueue.mark_done`,
    typically inside its own transaction). An exception marks the job failed;
    exceptions with a true ``permanent`` attribute make it dead at once, and those
    with ``counts_as_attempt = False`` return it to pending as if never claimed.
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
                if getattr(exc, "counts_as_attempt", True) is False:  # e.g. shutdown while waiting for a cluster
                    log.info("job %d returned to pending without counting the attempt: %s", job.id, exc)
                    self.queue.release(job.id)
                    continue
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
