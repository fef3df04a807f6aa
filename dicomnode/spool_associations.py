"""The spool's association bookkeeping: associations and receive-journal backlog reports in the index.

A mixin of :class:`dicomnode.spool.Spool` (tables ``associations`` and ``journal_backlog``, written through
:class:`dicomnode.store.ReceiveRepo`): which association sent what, when it was released or aborted, and how many acknowledged
instances each receiver's journal still holds.
"""

from __future__ import annotations

import logging
import sqlite3
import time

from dicomnode import store
from dicomnode.store import ReceiveRepo

log = logging.getLogger(__name__)

__all__ = ["AssociationIndex"]


class AssociationIndex:
    """Association and journal-backlog rows of the spool index (needs ``_conn``)."""

    @property
    def _conn(self) -> sqlite3.Connection:  # pragma: no cover - provided by Spool
        raise NotImplementedError

    def open_association(self, assoc_id: str, calling_ae: str, peer_host: str) -> None:
        """Record that an association was accepted."""
        ReceiveRepo(self._conn).open_association(assoc_id, calling_ae, peer_host)

    def release_association(self, assoc_id: str) -> None:
        """Record an orderly release; series that received instances in it learn their expected count.

        A series whose headers announced a count keeps it. Otherwise its expected count becomes its
        current instance count, unless another association that also sent instances of it is still
        open (a study split over parallel associations is not complete until the last one releases).
        A later association that adds instances updates the count again on its release.
        """
        conn = self._conn
        with store.transaction(conn):
            ReceiveRepo(conn).release_association(assoc_id)

    def close_stale_associations(self) -> int:
        """Mark associations still open in the index as aborted (call at start-up, before receiving).

        After a crash, associations of the dead process would otherwise look open forever and block
        expected counts. Returns how many were closed.
        """
        n = ReceiveRepo(self._conn).close_stale_associations()
        if n:
            log.warning("marked %d association(s) left open by a previous run as aborted", n)
        return n

    def set_journal_backlog(self, journal: str, pending: int) -> None:
        """Report how many acknowledged instances the journal ``journal`` has not moved into the spool yet."""
        ReceiveRepo(self._conn).set_journal_backlog(journal, pending)

    def journal_busy(self, now: float | None = None, stale_s: float = 5.0) -> bool:
        """True while a live receiver reports acknowledged instances that are not indexed yet.

        Reports older than ``stale_s`` (a receiver that died; its journal is replayed at start-up) are ignored.
        """
        now = time.time() if now is None else now
        return ReceiveRepo(self._conn).journal_busy_since(now - stale_s)

    def clear_journal_backlog(self) -> None:
        """Forget backlog reports (start-up, after the journals were replayed)."""
        ReceiveRepo(self._conn).clear_journal_backlog()

    def abort_association(self, assoc_id: str) -> None:
        """Record that an association was aborted (no expected counts are derived from it)."""
        ReceiveRepo(self._conn).abort_association(assoc_id)

    def last_association_release(self, study_uid: str) -> float | None:
        """Latest ``released_at`` of associations that stored instances of ``study_uid`` (None if none released)."""
        return ReceiveRepo(self._conn).last_association_release(study_uid)
