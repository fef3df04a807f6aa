"""Outbox repository: the ``deliveries`` table. The only code that writes it."""

from __future__ import annotations

import sqlite3
import time

__all__ = ["OutboxRepo"]


class OutboxRepo:
    """SQL of the outbox and the sender on ``conn`` (inside the caller's transaction where it opened one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, rows: list[tuple[str, str, str]], *, job_id: int | None, study_uid: str | None) -> int:
        """Insert deliveries ``(relative path, SOP Instance UID, destination)``; returns how many are new."""
        now = time.time()
        n = 0
        for rel_path, sop, dest in rows:
            n += self.conn.execute(
                "INSERT OR IGNORE INTO deliveries (job_id, study_uid, sop_instance_uid, path, destination,"
                " created_at) VALUES (?,?,?,?,?,?)", (job_id, study_uid, sop, rel_path, dest, now)).rowcount
        return n

    def due(self, now: float, limit: int) -> list[sqlite3.Row]:
        """Pending deliveries whose retry time has come, oldest first."""
        return self.conn.execute("SELECT * FROM deliveries WHERE state='pending' AND next_attempt_at<=?"
                                 " ORDER BY id LIMIT ?", (now, limit)).fetchall()

    def mark_sent(self, delivery_id: int, now: float) -> None:
        """The peer confirmed the store."""
        self.conn.execute("UPDATE deliveries SET state='sent', sent_at=?, attempts=attempts+1, last_error=NULL"
                          " WHERE id=?", (now, delivery_id))

    def attempts(self, delivery_id: int) -> int | None:
        """Attempts so far (None: no such delivery)."""
        row = self.conn.execute("SELECT attempts FROM deliveries WHERE id=?", (delivery_id,)).fetchone()
        return None if row is None else int(row["attempts"])

    def set_failed(self, delivery_id: int, state: str, attempts: int, due: float, error: str) -> None:
        """A failed attempt: ``pending`` again from ``due``, or ``dead``."""
        self.conn.execute("UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=? WHERE id=?",
                          (state, attempts, due, error[:2000], delivery_id))

    def finished_jobs(self, older_than: float) -> list[int]:
        """Jobs whose deliveries are all sent or dead, the last one before ``older_than``."""
        rows = self.conn.execute(
            "SELECT job_id FROM deliveries WHERE job_id IS NOT NULL GROUP BY job_id"
            " HAVING SUM(state='pending')=0 AND MAX(COALESCE(sent_at, next_attempt_at))<?", (older_than,)).fetchall()
        return [int(r["job_id"]) for r in rows]

    def rows(self, limit: int) -> list[sqlite3.Row]:
        """Deliveries, newest first."""
        return self.conn.execute("SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", (limit,)).fetchall()

    def counts(self) -> dict[str, int]:
        """Deliveries per state."""
        return {r["state"]: r["n"] for r in
                self.conn.execute("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state")}
