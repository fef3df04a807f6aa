"""Quarantine repository: the ``quarantine`` table. The only code that writes it."""

from __future__ import annotations

import sqlite3
import time

__all__ = ["QuarantineRepo"]


class QuarantineRepo:
    """SQL of the quarantine on ``conn``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def add(self, rel_path: str, kind: str, reason: str, sop_instance_uid: str | None, assoc_id: str | None,
            acknowledged: bool) -> None:
        """Record one quarantined file."""
        self.conn.execute("INSERT INTO quarantine (path, kind, reason, sop_instance_uid, assoc_id, acknowledged,"
                          " quarantined_at) VALUES (?,?,?,?,?,?,?)",
                          (rel_path, kind, reason, sop_instance_uid, assoc_id, int(acknowledged), time.time()))

    def rows(self) -> list[sqlite3.Row]:
        """Every quarantine row, newest first (none where the table does not exist yet)."""
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='quarantine'").fetchone() is None:
            return []
        return self.conn.execute("SELECT * FROM quarantine ORDER BY id DESC").fetchall()
