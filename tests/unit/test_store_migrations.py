"""The node database's versioned migrations, tested from each earlier released schema."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from dicomnode.jobs import JobQueue
from dicomnode.outbox import Outbox
from dicomnode.quarantine import list_quarantined
from dicomnode.spool import Spool
from dicomnode.store import SCHEMA_VERSION, StoreVersionError, connect, ensure, migrate, schema_version

SCHEMAS = Path(__file__).parent / "store_schemas"
RELEASES = ["release1.sql", "release2.sql"]


def _shape(conn: sqlite3.Connection) -> dict[str, object]:
    """Tables with their columns (name, type, not null, default, pk) and index names."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'"
                                         " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    shape: dict[str, object] = {t: [tuple(c)[1:] for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    shape["indexes"] = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'"
                                                          " AND name NOT LIKE 'sqlite_%'"))
    return shape


def _fresh_shape(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "fresh" / "node.db"
    ensure(path)
    conn = connect(path)
    try:
        return _shape(conn)
    finally:
        conn.close()


def _released_db(tmp_path: Path, release: str, ddl: str | None = None) -> Path:
    """A database as a released node left it, with one row in each of its tables."""
    path = tmp_path / "node.db"
    conn = connect(path)
    conn.executescript(ddl if ddl is not None else (SCHEMAS / release).read_text())
    conn.execute("INSERT INTO instances VALUES ('1.2.3.1','1.2.840.10008.5.1.4.1.1.2','1.2.3','1.2.3.4',"
                 "'spool/1.2.3/1.2.3.4/1.2.3.1.dcm','1.2.840.10008.1.2.1',1.0,'a1')")
    conn.execute("INSERT INTO series (series_uid, study_uid, meta_json, n_instances, first_received, last_received)"
                 " VALUES ('1.2.3.4','1.2.3','{}',1,1.0,1.0)")
    conn.execute("INSERT INTO jobs (study_uid, route, task, series_uids, created_at, updated_at)"
                 " VALUES ('1.2.3','r','t','[\"1.2.3.4\"]',1.0,1.0)")
    conn.execute("INSERT INTO deliveries (job_id, sop_instance_uid, path, destination, created_at)"
                 " VALUES (1,'9.9','outbox/job-1/000_9.9.dcm','pacs',1.0)")
    conn.execute("INSERT INTO studies (study_uid, state) VALUES ('1.2.3','receiving')")
    if release == "release2.sql":
        conn.execute("INSERT INTO quarantine (path, kind, reason, acknowledged, quarantined_at)"
                     " VALUES ('quarantine/x.dcm','unreadable','bad',1,1.0)")
    conn.close()
    return path


@pytest.mark.parametrize("release", RELEASES)
def test_released_schema_migrates_to_current_keeping_rows(tmp_path: Path, release: str) -> None:
    path = _released_db(tmp_path, release)
    conn = connect(path)
    assert schema_version(conn) == 0
    assert migrate(conn) == 0
    assert schema_version(conn) == SCHEMA_VERSION
    assert _shape(conn) == _fresh_shape(tmp_path)
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == (release == "release2.sql")
    conn.close()
    # the stages work on the upgraded file
    queue = JobQueue(path)
    job = queue.claim()
    assert job is not None and job.study_uid == "1.2.3" and job.series_uids == ("1.2.3.4",)
    assert Outbox(tmp_path).counts() == {"pending": 1}
    assert [s.series_uid for s in Spool(tmp_path, 0.0).series_records("1.2.3")] == ["1.2.3.4"]
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "x.dcm").write_bytes(b"x")
    conn = connect(path)
    assert len(list_quarantined(conn, tmp_path)) == (release == "release2.sql")
    conn.close()


def test_database_older_than_the_first_release_gains_expected_source(tmp_path: Path) -> None:
    ddl = (SCHEMAS / "release1.sql").read_text().replace("    expected_count INTEGER,\n    expected_source TEXT\n",
                                                         "    expected_count INTEGER\n")
    assert "expected_source" not in ddl
    path = _released_db(tmp_path, "release1.sql", ddl)
    ensure(path)
    conn = connect(path)
    assert _shape(conn) == _fresh_shape(tmp_path)
    conn.close()


def test_migration_is_idempotent_and_current_database_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    ensure(path)
    conn = connect(path)
    before = _shape(conn)
    assert migrate(conn) == SCHEMA_VERSION
    assert _shape(conn) == before
    conn.close()


def test_newer_database_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    conn = connect(path)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreVersionError, match=r"newer than this node's .*restore a backup"):
        ensure(path)
    conn = connect(path)
    assert schema_version(conn) == SCHEMA_VERSION + 1
    assert conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0  # nothing created
    conn.close()


def test_processes_starting_together_migrate_once(tmp_path: Path) -> None:
    path = _released_db(tmp_path, "release1.sql")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            ensure(path)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = connect(path)
    assert schema_version(conn) == SCHEMA_VERSION and _shape(conn) == _fresh_shape(tmp_path)
    conn.close()
