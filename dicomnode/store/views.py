"""Read-only views of the node database for ``dicomnode status``, the HTTP pages and the metrics.

A :class:`StoreView` holds a ``query_only`` connection: nothing here can write. Every query returns
nothing for a table the database does not have yet (a node that has not run every stage).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from types import TracebackType

from dicomnode.store.connection import read_only
from dicomnode.store.quarantine import QuarantineRepo

__all__ = ["StoreView"]


class StoreView:
    """Read-only queries over ``<storage_dir>/node.db`` (use as a context manager)."""

    def __init__(self, path: Path, *, timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.conn = read_only(self.path, timeout_s=timeout_s)
        self._owned = True

    @classmethod
    def on(cls, conn: sqlite3.Connection) -> StoreView:
        """A view over a connection the caller already holds (not closed by :meth:`close`)."""
        view = cls.__new__(cls)
        view.path, view.conn, view._owned = Path(""), conn, False
        return view

    def __enter__(self) -> StoreView:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (when the view opened it)."""
        if self._owned:
            self.conn.close()

    def has_table(self, name: str) -> bool:
        """True when the database has table ``name``."""
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                                 (name,)).fetchone() is not None

    def _rows(self, table: str, sql: str, args: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall() if self.has_table(table) else []

    def ping(self) -> None:
        """Raise ``sqlite3.Error`` when the database cannot be read."""
        self.conn.execute("SELECT 1").fetchone()

    # ------------------------------------------------------------------ status
    def journal_backlog(self) -> list[sqlite3.Row]:
        """Receive journals with acknowledged instances not yet indexed."""
        return self._rows("journal_backlog", "SELECT * FROM journal_backlog WHERE pending > 0 ORDER BY journal")

    def recent_studies(self, limit: int) -> list[sqlite3.Row]:
        """Studies, latest completed first."""
        return self._rows("studies", "SELECT * FROM studies ORDER BY COALESCE(completed_at, 0) DESC LIMIT ?",
                          (limit,))

    def recent_series(self, limit: int) -> list[sqlite3.Row]:
        """Series, latest received first."""
        return self._rows("series", "SELECT * FROM series ORDER BY last_received DESC LIMIT ?", (limit,))

    def recent_jobs(self, limit: int) -> list[sqlite3.Row]:
        """Jobs, newest first."""
        return self._rows("jobs", "SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))

    def recent_deliveries(self, limit: int) -> list[sqlite3.Row]:
        """Deliveries, newest first."""
        return self._rows("deliveries", "SELECT * FROM deliveries ORDER BY id DESC LIMIT ?", (limit,))

    def dead_deliveries(self) -> list[sqlite3.Row]:
        """Deliveries that will not be retried."""
        return self._rows("deliveries", "SELECT * FROM deliveries WHERE state='dead' ORDER BY id DESC")

    def failing_jobs(self) -> list[sqlite3.Row]:
        """Dead jobs and jobs waiting to be retried."""
        return self._rows("jobs", "SELECT * FROM jobs WHERE state='dead' OR (state='pending' AND attempts>0)"
                                  " ORDER BY id DESC")

    def quarantine_rows(self) -> list[sqlite3.Row]:
        """Quarantine rows, newest first."""
        return QuarantineRepo(self.conn).rows()

    # ------------------------------------------------------------------ HTTP
    def study_counts(self) -> dict[str, int]:
        """Studies per state."""
        return {r["state"]: r["n"] for r in
                self._rows("studies", "SELECT state, COUNT(*) AS n FROM studies GROUP BY state")}

    def study_overview(self, limit: int) -> list[sqlite3.Row]:
        """Recent studies with their first receive time (``first``)."""
        return self._rows("studies",
                          "SELECT st.study_uid, st.state, st.completed_at, (SELECT MIN(first_received) FROM series s"
                          " WHERE s.study_uid = st.study_uid) AS first FROM studies st"
                          " ORDER BY COALESCE(st.completed_at, st.last_instance_at, 0) DESC LIMIT ?", (limit,))

    def study_jobs(self, study_uid: str) -> list[sqlite3.Row]:
        """Jobs of a study, latest generation first."""
        return self._rows("jobs", "SELECT * FROM jobs WHERE study_uid=? ORDER BY generation DESC, id", (study_uid,))

    def job_deliveries(self, job_id: int) -> list[sqlite3.Row]:
        """Deliveries of a job (id, path, state, sent_at)."""
        return self._rows("deliveries", "SELECT id, path, state, sent_at FROM deliveries WHERE job_id=? ORDER BY id",
                          (job_id,))

    def delivery_path(self, delivery_id: int) -> str | None:
        """Relative path of a delivery's file."""
        rows = self._rows("deliveries", "SELECT path FROM deliveries WHERE id=?", (delivery_id,))
        return rows[0]["path"] if rows else None

    # ------------------------------------------------------------------ metrics
    def gauges(self) -> dict[str, list[tuple[object, ...]]]:
        """Rows ``(labels..., count)`` of the studies, jobs, deliveries and instances gauges."""
        queries = (("studies", "studies", "SELECT state, COUNT(*) FROM studies GROUP BY state"),
                   ("jobs", "jobs", "SELECT task, state, COUNT(*) FROM jobs GROUP BY task, state"),
                   ("deliveries", "deliveries",
                    "SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state"),
                   ("instances", "instances", "SELECT COUNT(*) FROM instances"))
        return {name: [tuple(r) for r in self._rows(table, sql)] for name, table, sql in queries}

    def job_timing(self, job_id: int) -> sqlite3.Row | None:
        """Task, model version, finish time, series and study completion time of a job."""
        rows = self._rows("jobs", "SELECT j.task, j.model_version, j.updated_at, j.state, j.series_uids,"
                                  " st.completed_at FROM jobs j LEFT JOIN studies st ON st.study_uid = j.study_uid"
                                  " WHERE j.id=?", (job_id,))
        return rows[0] if rows else None

    def first_received(self, series_uids_json: str | None) -> float | None:
        """First receive time of the series in a job's ``series_uids``."""
        series = json.loads(series_uids_json or "[]")
        if not series:
            return None
        marks = ",".join("?" * len(series))
        got = self.conn.execute(f"SELECT MIN(first_received) AS t FROM series WHERE series_uid IN ({marks})",  # noqa: S608
                                series).fetchone()
        return got["t"] if got else None

    def undelivered(self, job_id: int) -> int:
        """Deliveries of a job not sent yet."""
        return int(self.conn.execute("SELECT COUNT(*) AS n FROM deliveries WHERE job_id=? AND state!='sent'",
                                     (job_id,)).fetchone()["n"])
