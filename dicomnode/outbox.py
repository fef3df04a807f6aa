"""Durable outbox: result files waiting to be sent, and their per-destination deliveries.

Result objects are written atomically (temp file, fsync, rename) under
``<storage_dir>/outbox/job-<id>/``. Each (file, destination) pair is one row of
``deliveries`` (pending -> sent | dead). A row is marked sent only after the
peer confirmed the store; since every file keeps its SOP Instance UID, a resend
after a crash overwrites the same instance in the PACS instead of duplicating it.

Its table, ``deliveries``, is written only through :class:`dicomnode.store.OutboxRepo`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset

from dicomnode import store
from dicomnode.errors import ResultWriteError
from dicomnode.fsutil import fsync_path
from dicomnode.store import OutboxRepo

log = logging.getLogger(__name__)

__all__ = ["Delivery", "Outbox"]

@dataclass(frozen=True)
class Delivery:
    """One (file, destination) pair."""

    id: int
    job_id: int | None
    study_uid: str | None
    sop_instance_uid: str
    path: Path
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


class Outbox:
    """Result files and the ``deliveries`` table in the node database."""

    def __init__(self, storage_dir: Path) -> None:
        self.storage_dir = Path(storage_dir)
        self.root = self.storage_dir / "outbox"
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = store.db_path(self.storage_dir)
        store.ensure(self.db_path)

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        return store.thread_connection(self.db_path)

    def write_datasets(self, job_id: int, datasets: Sequence[Dataset]) -> list[Path]:
        """Write result objects atomically into ``outbox/job-<id>/`` (replacing an earlier partial attempt)."""
        folder = self.root / f"job-{job_id}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        paths: list[Path] = []
        try:
            for i, ds in enumerate(datasets):
                final = folder / f"{i:03d}_{ds.SOPInstanceUID}.dcm"
                tmp = folder / f".{uuid.uuid4().hex}.part"
                ds.save_as(tmp, enforce_file_format=True)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
                paths.append(final)
            fsync_path(folder)
            fsync_path(self.root)
        except (OSError, ValueError, AttributeError) as exc:
            raise ResultWriteError(f"cannot write result objects of job {job_id}: {exc}") from exc
        return paths

    def add(self, conn: sqlite3.Connection, paths: Sequence[Path], destinations: Sequence[str], *,
            job_id: int | None, study_uid: str | None, sop_uids: Sequence[str]) -> int:
        """Insert deliveries for every (path, destination); call inside the caller's transaction."""
        return OutboxRepo(conn).add(self.delivery_rows(paths, destinations, sop_uids), job_id=job_id,
                                    study_uid=study_uid)

    def delivery_rows(self, paths: Sequence[Path], destinations: Sequence[str],
                      sop_uids: Sequence[str]) -> list[tuple[str, str, str]]:
        """``(path relative to the storage folder, SOP Instance UID, destination)`` for every pair."""
        return [(str(Path(path).relative_to(self.storage_dir)), sop, dest)
                for path, sop in zip(paths, sop_uids, strict=True) for dest in destinations]

    def _row(self, r: sqlite3.Row) -> Delivery:
        return Delivery(r["id"], r["job_id"], r["study_uid"], r["sop_instance_uid"], self.storage_dir / r["path"],
                        r["destination"], r["state"], r["attempts"], r["next_attempt_at"], r["last_error"])

    def due(self, now: float | None = None, limit: int = 200) -> dict[str, list[Delivery]]:
        """Pending deliveries whose retry time has come, grouped by destination, oldest first."""
        now = time.time() if now is None else now
        rows = OutboxRepo(self.conn).due(now, limit)
        out: dict[str, list[Delivery]] = {}
        for r in rows:
            out.setdefault(r["destination"], []).append(self._row(r))
        return out

    def mark_sent(self, delivery_id: int) -> None:
        """The peer confirmed the store."""
        OutboxRepo(self.conn).mark_sent(delivery_id, time.time())

    def mark_failed(self, delivery_id: int, error: str, *, transient: bool, max_retries: int,
                    backoff_initial_s: float, backoff_max_s: float) -> str:
        """Record a failed attempt: retry later with exponential backoff, or ``dead``. Returns the new state."""
        conn = self.conn
        now = time.time()
        repo = OutboxRepo(conn)
        with store.transaction(conn):
            before = repo.attempts(delivery_id)
            if before is None:
                return "missing"
            attempts = before + 1
            if not transient or attempts > max_retries:
                state, due = "dead", now
            else:
                state, due = "pending", now + min(backoff_max_s, backoff_initial_s * 2 ** (attempts - 1))
            repo.set_failed(delivery_id, state, attempts, due, error)
        return state

    def purge_sent(self, older_than: float) -> int:
        """Delete result folders whose deliveries are all sent (or dead) before ``older_than``; returns folders removed.

        Rows stay in ``deliveries`` for ``dicomnode status``.
        """
        n = 0
        for job_id in OutboxRepo(self.conn).finished_jobs(older_than):
            folder = self.root / f"job-{job_id}"
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                n += 1
        return n

    def list(self, limit: int = 1000) -> list[Delivery]:
        """Deliveries, newest first."""
        return [self._row(r) for r in OutboxRepo(self.conn).rows(limit)]

    def counts(self) -> dict[str, int]:
        """Number of deliveries per state."""
        return OutboxRepo(self.conn).counts()
