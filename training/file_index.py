"""What a training start-up learns about each data file, remembered in memory and in a persistent index.

A start-up reads every DICOM header to join the manifest with the files
(:func:`training.data.index_dicom`: StudyInstanceUID, SOPInstanceUID, PatientID)
and hashes every DICOM byte to key the sample cache and the bundle's data hash
(:func:`training.data.record_hash`): for an HR-pQCT set of 200 scans, 27,000
files and 3.6 GB. A :class:`FileIndex` stores both results in SQLite next to the
sample cache, keyed by the file's resolved path, size, modification time,
change time and inode, so a later process (a resumed run, the next ``train``
over the same folder and cache) reads them instead of the files. Any write to a
file changes its change time (``st_ctime_ns``, which tools cannot set back), so
a stale entry is never returned for rewritten content.

A damaged or unwritable index is not an error: the digest is computed from the
file, a warning is logged once, and nothing is lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from pathlib import Path
from typing import NamedTuple

import pydicom

log = logging.getLogger(__name__)

__all__ = ["FILE_INDEX_NAME", "DicomUids", "FileIndex", "dicom_uids", "file_digest"]

#: file name of the index inside a sample cache directory
FILE_INDEX_NAME = "file_index.sqlite"

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


class DicomUids(NamedTuple):
    """The identifiers of a DICOM file that join it with a manifest row (empty strings when absent)."""

    study_uid: str
    sop_uid: str
    patient_id: str


_UID_TAGS = ["StudyInstanceUID", "SOPInstanceUID", "PatientID"]
_NOT_DICOM = "\x00not-dicom"


def _read_uids(path: Path) -> DicomUids | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS)
    except (pydicom.errors.InvalidDicomError, ValueError, AttributeError, EOFError):
        return None
    return DicomUids(*(str(ds.get(t, "") or "") for t in _UID_TAGS))


class FileIndex:
    """Persistent index of file digests and DICOM identifiers in an SQLite file (created on first use).

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
                for table in _TABLES:
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (path TEXT, size INTEGER, mtime INTEGER, "
                                 "ctime INTEGER, inode INTEGER, value TEXT NOT NULL, "
                                 "PRIMARY KEY (path, size, mtime, ctime, inode))")
            except (sqlite3.Error, OSError) as exc:
                self._disable(exc)
                return None
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _disable(self, exc: BaseException) -> None:
        self._broken = True
        log.warning("file index %s unusable (%s); files are read instead", self.path, exc)

    def lookup(self, table: str, key: _Key) -> str | None:
        """The value stored in ``table`` (``digest`` or ``uids``) for ``key``, or None."""
        conn = self._connect()
        if conn is None:
            return None
        try:
            row = conn.execute(f"SELECT value FROM {_table(table)} WHERE path=? AND size=? AND mtime=? AND ctime=? "
                               "AND inode=?", key).fetchone()
        except sqlite3.Error as exc:
            self._disable(exc)
            return None
        return None if row is None else str(row[0])

    def store(self, table: str, key: _Key, value: str) -> None:
        """Remember ``value`` in ``table`` for ``key`` (an older entry of the same path is replaced)."""
        conn = self._connect()
        if conn is None:
            return
        t = _table(table)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"DELETE FROM {t} WHERE path=?", (key[0],))
            conn.execute(f"INSERT INTO {t} VALUES (?, ?, ?, ?, ?, ?)", (*key, value))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._disable(exc)

    def count(self, table: str = "digest") -> int:
        """Number of entries in ``table``."""
        conn = self._connect()
        if conn is None:
            return 0
        try:
            return int(conn.execute(f"SELECT COUNT(*) FROM {_table(table)}").fetchone()[0])
        except sqlite3.Error:
            return 0

    def __getstate__(self) -> dict[str, object]:  # picklable for worker processes: no connection
        return {"path": self.path, "_conn": None, "_pid": -1, "_broken": self._broken}


_TABLES = ("digest", "uids")


def _table(name: str) -> str:
    if name not in _TABLES:
        raise ValueError(f"unknown file index table {name!r}")
    return name


def file_digest(path: str | os.PathLike[str], index: FileIndex | None = None) -> str:
    """SHA-256 hex digest of a file's bytes, from memory, then ``index``, then the file itself."""
    p = Path(path)
    key = _key(p)
    hit = _MEMORY.get(key)
    if hit is None and index is not None:
        hit = index.lookup("digest", key)
    if hit is None:
        hit = _hash_file(p)
        if index is not None:
            index.store("digest", key, hit)
    _MEMORY[key] = hit
    return hit


def dicom_uids(path: str | os.PathLike[str], index: FileIndex | None = None) -> DicomUids | None:
    """Study, SOP instance UID and patient ID of a DICOM file (None if it is not DICOM), via ``index``.

    Raises
    ------
    OSError
        If the file cannot be read (nothing is remembered then).
    """
    p = Path(path)
    if index is None:
        return _read_uids(p)
    key = _key(p)
    hit = index.lookup("uids", key)
    if hit is not None:
        return None if hit == _NOT_DICOM else DicomUids(*hit.split("\x00"))
    uids = _read_uids(p)
    index.store("uids", key, _NOT_DICOM if uids is None else "\x00".join(uids))
    return uids
