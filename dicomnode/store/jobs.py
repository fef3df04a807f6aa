"""Jobs repository: the ``jobs`` table. The only code that writes it."""

from __future__ import annotations

import json
import sqlite3
import time

__all__ = ["JobsRepo"]


class JobsRepo:
    """SQL of the job queue on ``conn`` (inside the caller's transaction where it opened one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def enqueue(self, study_uid: str, route: str, task: str, series_uids: list[str], generation: int) -> int | None:
        """Add a job unless (study, route, generation) exists; the new id or None."""
        now = time.time()
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO jobs (study_uid, route, task, generation, series_uids, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?)", (study_uid, route, task, generation, json.dumps(sorted(series_uids)), now, now))
        return int(cur.lastrowid) if cur.rowcount and cur.lastrowid is not None else None

    def next_due(self, now: float) -> int | None:
        """Id of the oldest pending job due at ``now``."""
        row = self.conn.execute("SELECT id FROM jobs WHERE state='pending' AND next_attempt_at<=? ORDER BY id"
                                " LIMIT 1", (now,)).fetchone()
        return None if row is None else int(row["id"])

    def mark_running(self, job_id: int, now: float) -> None:
        """A worker took the job."""
        self.conn.execute("UPDATE jobs SET state='running', attempts=attempts+1, updated_at=? WHERE id=?"
                          " AND state='pending'", (now, job_id))

    def get(self, job_id: int) -> sqlite3.Row | None:
        """One row by id."""
        return self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()

    def state(self, job_id: int) -> str | None:
        """The job's state (None: no such job)."""
        row = self.conn.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else str(row["state"])

    def mark_done(self, job_id: int, timings: dict[str, float] | None, model_version: str | None) -> None:
        """The job finished."""
        self.conn.execute(
            "UPDATE jobs SET state='done', last_error=NULL, updated_at=?, timings=?, model_version=? WHERE id=?",
            (time.time(), json.dumps(timings or {}), model_version, job_id))

    def set_failed(self, job_id: int, state: str, due: float, error: str, now: float) -> None:
        """A failed attempt: ``pending`` again from ``due``, or ``dead``."""
        self.conn.execute("UPDATE jobs SET state=?, next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                          (state, due, error[:2000], now, job_id))

    def release(self, job_id: int) -> None:
        """Back to pending without counting the attempt."""
        self.conn.execute("UPDATE jobs SET state='pending', attempts=MAX(attempts-1,0), updated_at=? WHERE id=?"
                          " AND state='running'", (time.time(), job_id))

    def add_attempts(self, job_id: int, delta: int) -> None:
        """Adjust a running job's attempt count (the Ray engine gives back an attempt spent waiting for its cluster)."""
        self.conn.execute("UPDATE jobs SET attempts=MAX(attempts+?,0) WHERE id=? AND state='running'",
                          (delta, job_id))

    def recover(self) -> int:
        """Jobs left running by a dead process back to pending; how many."""
        return int(self.conn.execute("UPDATE jobs SET state='pending', updated_at=? WHERE state='running'",
                                     (time.time(),)).rowcount)

    def rows(self, study_uid: str | None, limit: int) -> list[sqlite3.Row]:
        """Jobs, newest first."""
        sql, args = "SELECT * FROM jobs", ()
        if study_uid is not None:
            sql, args = sql + " WHERE study_uid=?", (study_uid,)
        return self.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()

    def counts(self) -> dict[str, int]:
        """Jobs per state."""
        return {r["state"]: r["n"] for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

