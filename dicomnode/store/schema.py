"""The node database's schema and its versioned migrations.

``PRAGMA user_version`` holds the schema version. :func:`migrate` runs at start-up (every stage
opens the store through :func:`ensure`) and applies each missing step in one transaction, so
several processes starting together upgrade the file once.

Released schemas:

- version 1: the first release (spool, assembler, jobs and outbox tables). Databases of that
  release carry ``user_version`` 0; older ones may lack ``series.expected_source``.
- version 2: adds ``quarantine`` (acknowledged instances that could not be indexed). Databases
  of that release also carry ``user_version`` 0; step 1 finds its tables already there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from dicomnode.errors import DicomNodeError
from dicomnode.store.connection import connect, transaction

__all__ = ["SCHEMA_VERSION", "StoreVersionError", "ensure", "migrate", "schema_version"]

_V1_TABLES = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT,
    received_at REAL NOT NULL,
    assoc_id TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_assoc ON instances(assoc_id);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    meta_json TEXT NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    expected_count INTEGER,
    expected_source TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE INDEX IF NOT EXISTS series_last ON series(last_received);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    calling_ae TEXT,
    peer_host TEXT,
    opened_at REAL NOT NULL,
    released_at REAL,
    n_stored INTEGER NOT NULL DEFAULT 0,
    aborted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS journal_backlog (
    journal TEXT PRIMARY KEY,
    pending INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    routes TEXT,
    no_route_series TEXT,
    last_instance_at REAL,
    completed_at REAL,
    processed_at REAL,
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS result_series (
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    kind TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    series_number INTEGER,
    PRIMARY KEY (study_uid, route, kind)
);
CREATE TABLE IF NOT EXISTS result_documents (
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    PRIMARY KEY (study_uid, route)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    task TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    series_uids TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    timings TEXT,
    model_version TEXT,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER,
    study_uid TEXT,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (path, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, destination, next_attempt_at);
"""

_V2_TABLES = """
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    sop_instance_uid TEXT,
    assoc_id TEXT,
    acknowledged INTEGER NOT NULL,
    quarantined_at REAL NOT NULL
);
"""


class StoreVersionError(DicomNodeError):
    """The database was written by a newer node than this one."""


def _run(conn: sqlite3.Connection, ddl: str) -> None:
    """Run ``;``-separated DDL statement by statement (``executescript`` would commit the transaction)."""
    for statement in ddl.split(";"):
        if statement.strip():
            conn.execute(statement)


def _step1(conn: sqlite3.Connection) -> None:
    _run(conn, _V1_TABLES)
    columns = {r[1] for r in conn.execute("PRAGMA table_info(series)")}
    if "expected_source" not in columns:  # databases older than the first release
        conn.execute("ALTER TABLE series ADD COLUMN expected_source TEXT")


def _step2(conn: sqlite3.Connection) -> None:
    _run(conn, _V2_TABLES)


_STEPS: tuple[Callable[[sqlite3.Connection], None], ...] = (_step1, _step2)
SCHEMA_VERSION = len(_STEPS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in the database (0: new or written before versions were recorded)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to :data:`SCHEMA_VERSION`; returns the version it had before.

    Raises
    ------
    StoreVersionError
        The database has a newer version than this code knows.
    """
    before = schema_version(conn)
    if before == SCHEMA_VERSION:
        return before
    with transaction(conn):
        before = schema_version(conn)  # another process may have migrated meanwhile
        if before > SCHEMA_VERSION:
            raise StoreVersionError(
                f"node database schema version {before} is newer than this node's {SCHEMA_VERSION}: "
                "run the node version that wrote it, or restore a backup of the database")
        for step in _STEPS[before:]:
            step(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    return before


def ensure(path: Path) -> None:
    """Open the database at ``path`` (creating it) and migrate it; called by every stage at start-up."""
    conn = connect(path)
    try:
        migrate(conn)
    finally:
        conn.close()
