"""Assembly repository: ``studies``, ``result_series``, ``result_documents``. The only code that writes them."""

from __future__ import annotations

import json
import sqlite3
import time

__all__ = ["AssemblyRepo"]


class AssemblyRepo:
    """SQL of the assembler on ``conn`` (inside the caller's transaction where it opened one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def study(self, study_uid: str) -> sqlite3.Row | None:
        """One ``studies`` row."""
        return self.conn.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()

    def candidates(self) -> list[sqlite3.Row]:
        """Every spooled study with its latest receive time and the assembler's state (None: new)."""
        return self.conn.execute(
            "SELECT s.study_uid, MAX(s.last_received) AS last, st.state, st.completed_at, st.last_instance_at"
            " FROM series s LEFT JOIN studies st ON st.study_uid = s.study_uid GROUP BY s.study_uid").fetchall()

    def start_study(self, study_uid: str, last: float) -> None:
        """A new study is receiving."""
        self.conn.execute("INSERT OR IGNORE INTO studies (study_uid, state, last_instance_at) VALUES (?,?,?)",
                          (study_uid, "receiving", last))

    def reopen(self, study_uid: str, state: str) -> None:
        """Late instances: back to receiving with the next generation."""
        self.conn.execute("UPDATE studies SET state='receiving', generation=generation+1, processed_at=NULL"
                          " WHERE study_uid=? AND state=?", (study_uid, state))

    def mark_complete(self, study_uid: str, state: str, routes: list[str], no_route: list[str], last: float,
                      now: float) -> None:
        """The study is complete (``complete`` or ``no_route``)."""
        self.conn.execute("UPDATE studies SET state=?, routes=?, no_route_series=?, last_instance_at=?,"
                          " completed_at=? WHERE study_uid=?",
                          (state, json.dumps(sorted(routes)), json.dumps(no_route), last, now, study_uid))

    def expired(self, cutoff: float) -> list[str]:
        """Studies processed (or without a route) before ``cutoff`` and not purged yet."""
        rows = self.conn.execute(
            "SELECT study_uid FROM studies WHERE purged_at IS NULL AND ((state='processed' AND processed_at<?)"
            " OR (state='no_route' AND completed_at<?))", (cutoff, cutoff)).fetchall()
        return [r["study_uid"] for r in rows]

    def mark_purged(self, study_uid: str, now: float) -> None:
        """The study's spooled files were deleted."""
        self.conn.execute("UPDATE studies SET purged_at=? WHERE study_uid=?", (now, study_uid))

    def mark_processed_if_done(self, study_uid: str, generation: int) -> None:
        """Set the study ``processed`` when no job of ``generation`` is pending or running."""
        left = self.conn.execute("SELECT COUNT(*) AS n FROM jobs WHERE study_uid=? AND generation=? AND state IN"
                                 " ('pending','running')", (study_uid, generation)).fetchone()["n"]
        if left == 0:
            self.conn.execute("UPDATE studies SET state='processed', processed_at=? WHERE study_uid=?"
                              " AND generation=? AND state='complete'", (time.time(), study_uid, generation))

    def result_series(self, study_uid: str, route: str) -> list[sqlite3.Row]:
        """Result series (kind, series_uid, series_number) of (study, route)."""
        return self.conn.execute("SELECT kind, series_uid, series_number FROM result_series"
                                 " WHERE study_uid=? AND route=?", (study_uid, route)).fetchall()

    def result_document(self, study_uid: str, route: str) -> sqlite3.Row | None:
        """The latest SR of (study, route)."""
        return self.conn.execute("SELECT * FROM result_documents WHERE study_uid=? AND route=?",
                                 (study_uid, route)).fetchone()

    def save_result_series(self, study_uid: str, route: str, kind: str, series_uid: str,
                           series_number: int | None) -> None:
        """Record (or replace) one result series."""
        self.conn.execute("INSERT OR REPLACE INTO result_series (study_uid, route, kind, series_uid, series_number)"
                          " VALUES (?,?,?,?,?)", (study_uid, route, kind, series_uid, series_number))

    def save_result_document(self, study_uid: str, route: str, sr: tuple[str, str, str]) -> None:
        """Record the latest SR ``(series, sop instance, sop class)``."""
        self.conn.execute("INSERT OR REPLACE INTO result_documents (study_uid, route, series_uid, sop_instance_uid,"
                          " sop_class_uid) VALUES (?,?,?,?,?)", (study_uid, route, *sr))
