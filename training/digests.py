"""SHA-256 digests of data files, remembered in memory and (optionally) in a persistent index.

Record hashes (:func:`training.data.record_hash`) cover every DICOM byte, so a
training start-up reads the whole data set once (an HR-pQCT set of 500 scans is
4 GB). A :class:`DigestIndex` stores each file's digest in SQLite next to the
sample cache, keyed by the file's resolved path, size, modification time,
change time and inode: a later process (a resumed run, the next epoch's loader
workers, an evaluation over the same folder) reads the digest instead of the
file. Any write to the file changes its change time (``st_ctime_ns``, which
tools cannot set back), so a stale digest is never returned for rewritten
content.

A damaged or unwritable index is not an error: the digest is computed from the
file, a warning is logged once, and nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["DigestIndex", "file_digest"]

_Key = tuple[str, int, int, int, int]
_MEMORY: dict[_Key, str] = {}


def _key(path: Path) -> _Key:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DigestIndex:
    """Persistent file-digest index in an SQLite file (created on first use).

    Safe to share between processes: each process opens its own connection and
    SQLite serialises the writes.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._broken = False

    def _connect(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._conn is None or self._pid != os.getpid():  # a forked worker opens its own
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")  # commits append to the log: no fsync per file
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("CREATE TABLE IF NOT EXISTS digest (path TEXT, size INTEGER, mtime INTEGER, "
                             "ctime INTEGER, inode INTEGER, sha256 TEXT NOT NULL, "
                             "PRIMARY KEY (path, size, mtime, ctime, inode))")
            except (sqlite3.Error, OSError) as exc:
                self._disable(exc)
                return None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _disable(self, exc: BaseException) -> None:
        self._broken = True
        log.warning("file digest index %s unusable (%s); digests are computed from the files", self.path, exc)

    def lookup(self, key: _Key) -> str | None:
        """The stored digest of ``key``, or None."""
        conn = self._connect()
        if conn is None:
            return None
        try:
            row = conn.execute("SELECT sha256 FROM digest WHERE path=? AND size=? AND mtime=? AND ctime=? AND inode=?",
                               key).fetchone()
        except sqlite3.Error as exc:
            self._disable(exc)
            return None
        return None if row is None else str(row[0])

    def store(self, key: _Key, digest: str) -> None:
        """Remember ``digest`` for ``key`` (an older entry of the same path is replaced)."""
        conn = self._connect()
        if conn is None:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM digest WHERE path=?", (key[0],))
            conn.execute("INSERT INTO digest VALUES (?, ?, ?, ?, ?, ?)", (*key, digest))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._disable(exc)

    def __len__(self) -> int:
        conn = self._connect()
        if conn is None:
            return 0
        try:
            return int(conn.execute("SELECT COUNT(*) FROM digest").fetchone()[0])
        except sqlite3.Error:
            return 0

    def __getstate__(self) -> dict[str, object]:  # picklable for worker processes: no connection
        return {"path": self.path, "_conn": None, "_pid": -1, "_broken": self._broken}


def file_digest(path: str | os.PathLike[str], index: DigestIndex | None = None) -> str:
    """SHA-256 hex digest of a file's bytes, from memory, then ``index``, then the file itself."""
    p = Path(path)
    key = _key(p)
    hit = _MEMORY.get(key)
    if hit is None and index is not None:
        hit = index.lookup(key)
    if hit is None:
        hit = _hash_file(p)
        if index is not None:
            index.store(key, hit)
    _MEMORY[key] = hit
    return hit
