"""SQLite connections to the node database.

One database file (``<storage_dir>/node.db``) in WAL mode; connections are per
thread. Tables are created and upgraded only by :mod:`dicomnode.store.schema`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_local = threading.local()


def db_path(storage_dir: Path) -> Path:
    """Location of the node database inside ``storage_dir``."""
    return Path(storage_dir) / "node.db"


def connect(path: Path, *, timeout_s: float = 30.0) -> sqlite3.Connection:
    """Open a connection with WAL, foreign keys and a busy timeout.

    ``isolation_level=None`` puts the connection in autocommit mode; use
    :func:`transaction` for multi-statement atomic updates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    return conn


def thread_connection(path: Path) -> sqlite3.Connection:
    """Return this thread's cached connection to ``path``."""
    conns: dict[str, sqlite3.Connection] = getattr(_local, "conns", None) or {}
    _local.conns = conns
    key = str(Path(path).resolve())
    if key not in conns:
        conns[key] = connect(Path(path))
    return conns[key]


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def read_only(path: Path, *, timeout_s: float = 5.0) -> sqlite3.Connection:
    """A connection that cannot write (``PRAGMA query_only``): for status, HTTP and metrics views."""
    conn = sqlite3.connect(str(path), timeout=timeout_s, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
    conn.execute("PRAGMA query_only=ON")
    return conn
