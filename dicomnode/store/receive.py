"""Receive repository: the spool index (``instances``, ``series``) and association bookkeeping
(``associations``, ``journal_backlog``). The only code that writes these tables."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

__all__ = ["ReceiveRepo"]


class ReceiveRepo:
    """SQL of the receive stage on ``conn`` (inside the caller's transaction where it opened one)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # ------------------------------------------------------------------ instances and series

    def instance(self, sop: str) -> sqlite3.Row | None:
        """The index row of one instance."""
        return self.conn.execute("SELECT * FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone()

    def has_instance(self, sop: str) -> bool:
        """True when ``sop`` is indexed."""
        return self.conn.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (sop,)).fetchone() is not None

    def insert_instance(self, sop: str, sop_class: str, study: str, series: str, rel_path: str,
                        transfer_syntax: str, now: float, assoc_id: str | None) -> bool:
        """Index one placed instance; False when its SOP Instance UID was indexed meanwhile."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid, path,"
            " transfer_syntax, received_at, assoc_id) VALUES (?,?,?,?,?,?,?,?)",
            (sop, sop_class, study, series, rel_path, transfer_syntax, now, assoc_id))
        return cur.rowcount > 0

    def series_meta(self, series: str) -> dict[str, Any] | None:
        """The stored routing attributes of a series (None: not indexed)."""
        row = self.conn.execute("SELECT meta_json FROM series WHERE series_uid=?", (series,)).fetchone()
        return None if row is None else json.loads(row["meta_json"])

    def insert_series(self, series: str, study: str, meta: dict[str, Any], now: float,
                      expected: int | None) -> None:
        """First instance of a series (``expected`` from its header, or None)."""
        self.conn.execute(
            "INSERT INTO series (series_uid, study_uid, meta_json, n_instances, first_received,"
            " last_received, expected_count, expected_source) VALUES (?,?,?,?,?,?,?,?)",
            (series, study, json.dumps(meta), 1, now, now, expected, None if expected is None else "header"))

    def add_to_series(self, series: str, now: float, meta: dict[str, Any] | None = None) -> None:
        """One more instance in a series (and its merged routing attributes when they changed)."""
        if meta is not None:
            self.conn.execute("UPDATE series SET meta_json=? WHERE series_uid=?", (json.dumps(meta), series))
        self.conn.execute("UPDATE series SET n_instances=n_instances+1, last_received=? WHERE series_uid=?",
                          (now, series))

    def count_stored(self, assoc_id: str) -> None:
        """One more instance stored over ``assoc_id``."""
        self.conn.execute("UPDATE associations SET n_stored=n_stored+1 WHERE assoc_id=?", (assoc_id,))

    def remove_instance(self, sop: str, series: str, now: float) -> None:
        """Drop a replaced instance's row; its series is touched (and dropped when empty)."""
        self.conn.execute("DELETE FROM instances WHERE sop_instance_uid=?", (sop,))
        self.conn.execute("UPDATE series SET n_instances=n_instances-1, last_received=? WHERE series_uid=?",
                          (now, series))
        self.conn.execute("DELETE FROM series WHERE series_uid=? AND n_instances<=0", (series,))

    def series_rows(self, study_uid: str | None = None) -> list[sqlite3.Row]:
        """Series rows, all or of one study, oldest first."""
        sql, args = "SELECT * FROM series", ()
        if study_uid is not None:
            sql, args = sql + " WHERE study_uid=?", (study_uid,)
        return self.conn.execute(sql + " ORDER BY first_received, series_uid", args).fetchall()

    def instance_rows(self, study_uid: str, series_uid: str | None = None) -> list[sqlite3.Row]:
        """Instance rows of a study (or one series), in arrival order."""
        sql, args = "SELECT * FROM instances WHERE study_uid=?", (study_uid,)
        if series_uid is not None:
            sql, args = sql + " AND series_uid=?", (study_uid, series_uid)
        return self.conn.execute(sql + " ORDER BY received_at, sop_instance_uid", args).fetchall()

    def studies_received_since(self, ts: float) -> list[str]:
        """Study UIDs with an instance received at or after ``ts``."""
        rows = self.conn.execute("SELECT study_uid FROM series GROUP BY study_uid HAVING MAX(last_received) >= ?"
                                 " ORDER BY MIN(first_received)", (ts,)).fetchall()
        return [r["study_uid"] for r in rows]

    def study_last_received(self, study_uid: str) -> float | None:
        """Latest receive time of any series of the study."""
        return self.conn.execute("SELECT MAX(last_received) AS t FROM series WHERE study_uid=?",
                                 (study_uid,)).fetchone()["t"]

    def delete_study(self, study_uid: str) -> int:
        """Drop a study's index rows; returns the number of instances removed."""
        n = self.conn.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,)).rowcount
        self.conn.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
        return int(n)

    # ------------------------------------------------------------------ associations and journals

    def open_association(self, assoc_id: str, calling_ae: str, peer_host: str) -> None:
        """An association was accepted."""
        self.conn.execute(
            "INSERT OR REPLACE INTO associations (assoc_id, calling_ae, peer_host, opened_at) VALUES (?,?,?,?)",
            (assoc_id, calling_ae, peer_host, time.time()))

    def release_association(self, assoc_id: str) -> None:
        """An orderly release; series it sent learn their expected count (see the spool's docs)."""
        self.conn.execute("UPDATE associations SET released_at=? WHERE assoc_id=?", (time.time(), assoc_id))
        self.conn.execute(
            "UPDATE series SET expected_count=n_instances, expected_source='association'"
            " WHERE (expected_source IS NULL OR expected_source='association')"
            " AND series_uid IN (SELECT DISTINCT series_uid FROM instances WHERE assoc_id=?)"
            " AND NOT EXISTS (SELECT 1 FROM instances i JOIN associations a ON a.assoc_id=i.assoc_id"
            "   WHERE i.series_uid=series.series_uid AND a.assoc_id<>? AND a.released_at IS NULL"
            "   AND a.aborted=0)", (assoc_id, assoc_id))

    def abort_association(self, assoc_id: str) -> None:
        """An association was aborted."""
        self.conn.execute("UPDATE associations SET aborted=1 WHERE assoc_id=?", (assoc_id,))

    def close_stale_associations(self) -> int:
        """Mark associations still open as aborted; returns how many."""
        return int(self.conn.execute(
            "UPDATE associations SET aborted=1 WHERE released_at IS NULL AND aborted=0").rowcount)

    def last_association_release(self, study_uid: str) -> float | None:
        """Latest ``released_at`` of associations that stored instances of ``study_uid``."""
        row = self.conn.execute(
            "SELECT MAX(a.released_at) AS t FROM associations a WHERE a.assoc_id IN"
            " (SELECT DISTINCT assoc_id FROM instances WHERE study_uid=?)", (study_uid,)).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])

    def set_journal_backlog(self, journal: str, pending: int) -> None:
        """A receiver's journal holds ``pending`` acknowledged instances not yet indexed."""
        self.conn.execute("INSERT OR REPLACE INTO journal_backlog (journal, pending, updated_at) VALUES (?,?,?)",
                          (journal, int(pending), time.time()))

    def journal_busy_since(self, since: float) -> bool:
        """True when a backlog report newer than ``since`` has pending instances."""
        return self.conn.execute("SELECT 1 FROM journal_backlog WHERE pending > 0 AND updated_at >= ? LIMIT 1",
                                 (since,)).fetchone() is not None

    def clear_journal_backlog(self) -> None:
        """Forget backlog reports."""
        self.conn.execute("DELETE FROM journal_backlog")
