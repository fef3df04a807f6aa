"""dicomnode.store: one job one commit, read-only views, and no SQL outside the store."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from dicomnode import store
from dicomnode.jobs import JobQueue
from dicomnode.store import AssemblyRepo, FinishedJob, StoreView, commit_finished_job

ROOT = Path(__file__).resolve().parents[2]


def _running_job(tmp_path: Path) -> tuple[sqlite3.Connection, int]:
    path = store.db_path(tmp_path)
    queue = JobQueue(path)
    conn = store.connect(path)
    AssemblyRepo(conn).start_study("1.2.3", 1.0)
    AssemblyRepo(conn).mark_complete("1.2.3", "complete", ["r"], [], 1.0, 2.0)
    job_id = queue.enqueue("1.2.3", "r", "t", ["1.2.3.4"])
    assert job_id is not None and queue.claim() is not None
    return conn, job_id


def _finished(job_id: int, **kw: object) -> FinishedJob:
    args: dict[str, object] = {
        "deliveries": [("outbox/job-1/000_9.9.dcm", "9.9", "pacs"), ("outbox/job-1/000_9.9.dcm", "9.9", "archive")],
        "result_series": {"sr": ("1.2.3.9", 901)}, "sr": ("1.2.3.9", "9.9", "1.2.840.10008.5.1.4.1.1.88.34"),
        "timings": {"total": 1.5}, "model_version": "m 1"}
    args.update(kw)
    return FinishedJob(job_id, "1.2.3", "r", 1, **args)  # type: ignore[arg-type]


def _counts(conn: sqlite3.Connection) -> tuple[object, ...]:
    return (conn.execute("SELECT state FROM jobs").fetchone()[0],
            conn.execute("SELECT state FROM studies").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM result_series").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM result_documents").fetchone()[0])


def test_finished_job_records_everything_in_one_commit(tmp_path: Path) -> None:
    conn, job_id = _running_job(tmp_path)
    assert commit_finished_job(conn, _finished(job_id)) == "running"
    assert _counts(conn) == ("done", "processed", 2, 1, 1)
    assert commit_finished_job(conn, _finished(job_id)) == "done"  # a second commit writes nothing
    assert _counts(conn) == ("done", "processed", 2, 1, 1)


def test_failure_mid_commit_leaves_nothing_behind(tmp_path: Path) -> None:
    conn, job_id = _running_job(tmp_path)
    broken = _finished(job_id, result_series={"sr": (None, 1)})  # NOT NULL fails after the deliveries went in
    with pytest.raises(sqlite3.IntegrityError):
        commit_finished_job(conn, broken)
    assert _counts(conn) == ("running", "complete", 0, 0, 0)
    assert commit_finished_job(conn, _finished(job_id)) == "running"  # the retry commits
    assert _counts(conn) == ("done", "processed", 2, 1, 1)


def test_job_taken_away_gets_nothing_recorded(tmp_path: Path) -> None:
    conn, job_id = _running_job(tmp_path)
    JobQueue(store.db_path(tmp_path)).recover()  # a restart put it back to pending
    assert commit_finished_job(conn, _finished(job_id)) == "pending"
    assert _counts(conn) == ("pending", "complete", 0, 0, 0)


def test_views_cannot_write(tmp_path: Path) -> None:
    _running_job(tmp_path)
    with StoreView(store.db_path(tmp_path)) as view:
        assert [r["state"] for r in view.recent_jobs(10)] == ["running"]
        with pytest.raises(sqlite3.OperationalError, match="readonly|read-only|query_only"):
            view.conn.execute("DELETE FROM jobs")
    with StoreView(tmp_path / "empty.db") as view:  # tables missing: empty answers, no error
        assert view.recent_jobs(10) == [] and view.study_counts() == {} and view.quarantine_rows() == []


_SQL = re.compile(r"""["'][^"'\n]*\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"""
                  r"""CREATE\s+(TABLE|INDEX)|ALTER\s+TABLE|PRAGMA\s+table_info)\b""", re.IGNORECASE)


def test_no_sql_outside_the_store() -> None:
    """Every table is read and written only in dicomnode/store (connections' PRAGMAs excepted)."""
    offenders = []
    for path in sorted((ROOT / "dicomnode").rglob("*.py")):
        if "store" in path.relative_to(ROOT / "dicomnode").parts:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if _SQL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
