"""Assembler: decides from the spool index when a study is complete and enqueues its jobs.

It only reads the spool's tables, so it works with any number of receiver
processes. A study is complete when every series has been quiet for the
smallest ``complete_after_s`` of the routes it matches (and no receiver's
journal holds acknowledged instances not yet indexed), or earlier once the
association that sent it was released and each series holds its expected
instance count. On completion each series is routed (pure router) and one job
per (study, route, generation) is enqueued in the same transaction that marks
the study complete. Instances arriving after completion re-open the study with
``generation + 1``; the new jobs write into the same result series and their
SR supersedes the previous one (``result_series`` / ``result_documents``).

Its tables (``studies``, ``result_series``, ``result_documents``) are written only through
:class:`dicomnode.store.AssemblyRepo`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode import store
from dicomnode.config import Config
from dicomnode.jobs import JobQueue
from dicomnode.outbox import Outbox
from dicomnode.results import PriorDocument, ResultContext
from dicomnode.router import route_series
from dicomnode.spool import SeriesRecord, Spool
from dicomnode.store import AssemblyRepo, ReceiveRepo
from dicomnode.wakeup import Wakeup

log = logging.getLogger(__name__)

__all__ = ["Assembler", "StudyState", "load_result_context", "result_series_of"]

DEFAULT_QUIET_S = 10.0

@dataclass(frozen=True)
class StudyState:
    """One row of ``studies``."""

    study_uid: str
    state: str
    generation: int
    routes: list[str]
    no_route_series: list[str]
    last_instance_at: float | None
    completed_at: float | None
    processed_at: float | None


def load_result_context(conn: sqlite3.Connection, study_uid: str, route: str, ctx: ResultContext) -> ResultContext:
    """Fill ``ctx`` with the stored result series and the previous SR of (study, route)."""
    repo = AssemblyRepo(conn)
    for r in repo.result_series(study_uid, route):
        ctx.series_uids[r["kind"]] = r["series_uid"]
        if r["series_number"] is not None:
            ctx.series_numbers[r["kind"]] = int(r["series_number"])
    doc = repo.result_document(study_uid, route)
    if doc is not None:
        ctx.predecessors = [PriorDocument(study_uid, doc["series_uid"], doc["sop_instance_uid"], doc["sop_class_uid"])]
    return ctx


def result_series_of(ctx: ResultContext) -> dict[str, tuple[str, int | None]]:
    """The result series of ``ctx`` as :class:`dicomnode.store.FinishedJob` records them."""
    return {kind: (uid, ctx.series_numbers.get(kind)) for kind, uid in ctx.series_uids.items()}


class Assembler:
    """Polls the spool index and turns quiet or complete studies into jobs."""

    def __init__(self, cfg: Config, spool: Spool, queue: JobQueue, *, poll_s: float = 0.5,
                 outbox: Outbox | None = None, on_enqueue: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.on_enqueue = on_enqueue  # told after jobs were committed (wakes the workers)
        self.outbox = outbox
        self.spool = spool
        self.queue = queue
        self.poll_s = poll_s
        self.db_path = spool.db_path
        store.ensure(self.db_path)
        self._stop = threading.Event()
        self._wakeup = Wakeup()
        self._thread: threading.Thread | None = None
        self._last_purge = 0.0

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection."""
        return store.thread_connection(self.db_path)

    # ------------------------------------------------------------------ queries

    def study(self, study_uid: str) -> StudyState | None:
        """The assembler's record of a study."""
        r = AssemblyRepo(self.conn).study(study_uid)
        if r is None:
            return None
        return StudyState(r["study_uid"], r["state"], r["generation"], json.loads(r["routes"] or "[]"),
                          json.loads(r["no_route_series"] or "[]"), r["last_instance_at"], r["completed_at"],
                          r["processed_at"])

    def _quiet_s(self, rec: SeriesRecord) -> float:
        matched = route_series(rec.info(), self.cfg.routes)
        pool = matched or self.cfg.routes
        return min((r.complete_after_s for r in pool), default=DEFAULT_QUIET_S)

    def is_complete(self, study_uid: str, records: list[SeriesRecord], now: float) -> bool:
        """Quiet period elapsed for every series, or released with every expected count reached."""
        if not records:
            return False
        if (all(now - rec.last_received >= self._quiet_s(rec) for rec in records)
                and not self.spool.journal_busy()):  # quiet only counts once acknowledged instances are indexed
            return True
        released = self.spool.last_association_release(study_uid)
        last = max(rec.last_received for rec in records)
        return (released is not None and released >= last
                and all(rec.expected_count is not None and rec.n_instances >= rec.expected_count for rec in records))

    # ------------------------------------------------------------------ one pass

    def poll_once(self, now: float | None = None) -> list[str]:
        """Check every study that may need work; returns the studies completed in this pass."""
        now = time.time() if now is None else now
        repo = AssemblyRepo(self.conn)
        rows = repo.candidates()
        done: list[str] = []
        for r in rows:
            uid, state = r["study_uid"], r["state"]
            if state is None:
                repo.start_study(uid, r["last"])
                state = "receiving"
            elif state != "receiving" and r["last_instance_at"] is not None and r["last"] > r["last_instance_at"]:
                repo.reopen(uid, state)
                log.info("late instances re-open study %s", uid)
                state = "receiving"
            if state == "receiving" and self._complete_study(uid, now):
                done.append(uid)
        if now - self._last_purge > 60.0:
            self._last_purge = now
            self.purge_expired(now)
        return done

    def _complete_study(self, study_uid: str, now: float) -> bool:
        records = self.spool.series_records(study_uid)
        if not self.is_complete(study_uid, records, now):
            return False
        by_route: dict[str, list[str]] = {}
        tasks: dict[str, str] = {}
        no_route: list[str] = []
        for rec in records:
            matched = route_series(rec.info(), self.cfg.routes)
            if not matched:
                no_route.append(rec.series_uid)
            for route in matched:
                by_route.setdefault(route.name, []).append(rec.series_uid)
                tasks[route.name] = route.task
        last = max(rec.last_received for rec in records)
        conn = self.conn
        repo = AssemblyRepo(conn)
        with store.transaction(conn):
            row = repo.study(study_uid)
            if row is None or row["state"] != "receiving":
                return False
            cur_last = ReceiveRepo(conn).study_last_received(study_uid)
            if cur_last is not None and cur_last > last:
                return False  # an instance arrived since we read the records; look again next pass
            gen = int(row["generation"])
            for name, series in by_route.items():
                self.queue.enqueue(study_uid, name, tasks[name], series, generation=gen, conn=conn)
            state = "complete" if by_route else "no_route"
            repo.mark_complete(study_uid, state, list(by_route), no_route, last, now)
        log.info("study %s complete (generation %d): %d job(s), %d series without a route", study_uid, gen,
                 len(by_route), len(no_route))
        if by_route and self.on_enqueue is not None:
            self.on_enqueue()
        return True

    def purge_expired(self, now: float | None = None) -> int:
        """Delete spooled studies processed (or without a route) longer than ``retention_days`` ago.

        Result files already delivered that long ago are removed from the outbox too.
        """
        now = time.time() if now is None else now
        cutoff = now - self.cfg.node.retention_days * 86400.0
        repo = AssemblyRepo(self.conn)
        expired = repo.expired(cutoff)
        for study_uid in expired:
            self.spool.delete_study(study_uid)
            repo.mark_purged(study_uid, now)
        if self.outbox is not None:
            self.outbox.purge_sent(cutoff)
        return len(expired)

    # ------------------------------------------------------------------ thread

    def start(self) -> Assembler:
        """Poll in a background thread."""
        self._thread = threading.Thread(target=self._run, name="assembler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            token = self._wakeup.token()
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - keep polling after a database hiccup
                log.exception("assembler pass failed")
            self._wakeup.wait(token, self.poll_s)

    def wake(self) -> None:
        """Run the next pass now (an association was released: a study may be complete)."""
        self._wakeup.wake()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread."""
        self._stop.set()
        self._wakeup.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)

