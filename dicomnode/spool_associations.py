"""The spool's association bookkeeping: associations and receive-journal backlog reports in the index.

A mixin of :class:`dicomnode.spool.Spool` (tables ``associations`` and ``journal_backlog``, created by the
spool's schema): which association sent what, when it was released or aborted, and how many acknowledged
instances each receiver's journal still holds.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from dicomnode import db

log = logging.getLogger(__name__)

__all__ = ["AssociationIndex"]


class AssociationIndex:
    """Association and journal-backlog rows of the spool index (needs ``_conn``)."""

    @property
    def _conn(self) -> sqlite3.Connection:  # pragma: no cover - provided by Spool
        raise NotImplementedError

    def open_association(self, assoc_id: str, calling_ae: str, peer_host: str) -> None:
        """Record that an association was accepted."""
        self._conn.execute(
            "INSERT OR REPLACE INTO associations (assoc_id, calling_ae, peer_host, opened_at) VALUES (?,?,?,?)",
            (assoc_id, calling_ae, peer_host, time.time()))

    def release_association(self, assoc_id: str) -> None:
        """Record an orderly release; series that received instances in it learn their expected count.

        A series whose headers announced a count keeps it. Otherwise its expected count becomes its
        current instance count, unless another association that also sent instances of it is still
        open (a study split over parallel associations is not complete until the last one releases).
        A later association that adds instances updates the count again on its release.
        """
        conn = self._conn
        with db.transaction(conn):
            conn.execute("UPDATE associations SET released_at=? WHERE assoc_id=?", (time.time(), assoc_id))
            conn.execute(
                "UPDATE series SET expected_count=n_instances, expected_source='association'"
                " WHERE (expected_source IS NULL OR expected_source='association')"
                " AND series_uid IN (SELECT DISTINCT series_uid FROM instances WHERE assoc_id=?)"
                " AND NOT EXISTS (SELECT 1 FROM instances i JOIN associations a ON a.assoc_id=i.assoc_id"
                "   WHERE i.series_uid=series.series_uid AND a.assoc_id<>? AND a.released_at IS NULL"
                "   AND a.aborted=0)", (assoc_id, assoc_id))

    def close_stale_associations(self) -> int:
        """Mark associations still open in the index as aborted (call at start-up, before receiving).

        After a crash, associations of the dead process would otherwise look open forever and block
        expected counts. Returns how many were closed.
        """
        n = self._conn.execute(
            "UPDATE associations SET aborted=1 WHERE released_at IS NULL AND aborted=0").rowcount
        if n:
            log.warning("marked %d association(s) left open by a previous run as aborted", n)
        return n

    def set_journal_backlog(self, journal: str, pending: int) -> None:
        """Report how many acknowledged instances the journal ``journal`` has not moved into the spool yet."""
        self._conn.execute("INSERT OR REPLACE INTO journal_backlog (journal, pending, updated_at) VALUES (?,?,?)",
                           (journal, int(pending), time.time()))

    def journal_busy(self, now: float | None = None, stale_s: float = 5.0) -> bool:
        """True while a live receiver reports acknowledged instances that are not indexed yet.

        Reports older than ``stale_s`` (a receiver that died; its journal is replayed at start-up) are ignored.
        """
        now = time.time() if now is None else now
        row = self._conn.execute("SELECT 1 FROM journal_backlog WHERE pending > 0 AND updated_at >= ? LIMIT 1",
                                 (now - stale_s,)).fetchone()
        return row is not None

    def clear_journal_backlog(self) -> None:
        """Forget backlog reports (start-up, after the journals were replayed)."""
        self._conn.execute("DELETE FROM journal_backlog")

    def abort_association(self, assoc_id: str) -> None:
        """Record that an association was aborted (no expected counts are derived from it)."""
        self._conn.execute("UPDATE associations SET aborted=1 WHERE assoc_id=?", (assoc_id,))

    def last_association_release(self, study_uid: str) -> float | None:
        """Latest ``released_at`` of associations that stored instances of ``study_uid`` (None if none released)."""
        row = self._conn.execute(
            "SELECT MAX(a.released_at) AS t FROM associations a WHERE a.assoc_id IN"
            " (SELECT DISTINCT assoc_id FROM instances WHERE study_uid=?)", (study_uid,)).fetchone()
        return None if row is None or row["t"] is None else float(row["t"])
