"""The spool: received instances, durably on disk, indexed in SQLite.

Layout: ``<storage_dir>/spool/<study>/<series>/<sop>.dcm`` holding exactly the
bytes the peer sent (DICOM File Format: preamble, file meta, then the data set
as encoded on the wire; no decode, no re-encode). ``<storage_dir>/spool/.tmp``
holds partial writes.

Durability: :meth:`Spool.store` writes a temp file, fsyncs it, renames it
into place, fsyncs the directory and only then commits the index rows, so a
success status returned after it means the instance survives a crash or power
loss. A crash between rename and commit leaves a file without a row; the same
instance sent again is then stored normally.

Its tables (``instances``, ``series``, ``associations``, ``journal_backlog``: acknowledged instances a
receiver's journal still holds, reported by :mod:`dicomnode.native_scp`) are written only through
:class:`dicomnode.store.ReceiveRepo`.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pydicom

from dicomnode import store
from dicomnode.dicomscan import check_complete
from dicomnode.errors import InvalidDatasetError, OutOfResourcesError
from dicomnode.filemeta import dataset_digest as _digest
from dicomnode.filemeta import seek_dataset
from dicomnode.fsutil import fsync_path
from dicomnode.router import SeriesInfo, routing_meta
from dicomnode.spool_associations import AssociationIndex
from dicomnode.spool_sync import sync_files as _sync_filesystem
from dicomnode.store import ReceiveRepo

log = logging.getLogger(__name__)

__all__ = ["Identity", "SeriesRecord", "Spool", "StoreOutcome", "StoredInstance"]

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_GIB = 1024**3
_COPY_CHUNK = 1 << 20


class StoreOutcome(enum.Enum):
    """Result of :meth:`Spool.store`."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same data set was stored before
    REPLACED = "replaced"  # different content under a stored SOP Instance UID replaced it (resend_policy replace)
    RESEND_IGNORED = "resend_ignored"  # the same, kept the first copy (resend_policy keep_first)


@dataclass(frozen=True)
class StoredInstance:
    """One spooled instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    path: Path
    received_at: float


@dataclass(frozen=True)
class SeriesRecord:
    """One spooled series with the routing attributes of its first instance.

    ``expected_count`` is None until known: from the header (ImagesInAcquisition, or 1 for an
    enhanced multi-frame object) or, after an association that sent it was released, the count then.
    """

    series_uid: str
    study_uid: str
    meta: dict[str, Any] = field(hash=False)
    n_instances: int
    first_received: float
    last_received: float
    expected_count: int | None

    def info(self) -> SeriesInfo:
        """The router's view of this series."""
        return SeriesInfo.from_meta(self.meta, self.n_instances)




@dataclass(frozen=True)
class Identity:
    """What the index needs from a parsed instance (the receiver computes it before it answers success)."""

    sop: str
    sop_class: str
    study: str
    series: str
    transfer_syntax: str
    meta: dict[str, Any] = field(hash=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (journal record meta)."""
        return {"sop": self.sop, "sop_class": self.sop_class, "study": self.study, "series": self.series,
                "transfer_syntax": self.transfer_syntax, "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Identity:
        """Inverse of :meth:`to_json`."""
        return cls(d["sop"], d["sop_class"], d["study"], d["series"], d["transfer_syntax"], d["meta"])


_Identity = Identity


def _valid_uid(value: Any) -> str | None:
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    return text if 0 < len(text) <= 64 and _UID_RE.match(text) else None


def _expected_from_header(meta: dict[str, Any]) -> int | None:
    """Instance count a header announces: ImagesInAcquisition, or 1 for an enhanced multi-frame object."""
    n = meta.get("images_in_acquisition")
    if isinstance(n, int) and n > 0:
        return n
    frames = meta.get("number_of_frames")
    if isinstance(frames, int) and frames > 1:
        return 1
    return None


class Spool(AssociationIndex):
    """Durable store of received instances plus their SQLite index.

    Parameters
    ----------
    storage_dir:
        The node's storage directory (``cfg.node.storage_dir``).
    disk_min_free_gb:
        Below this much free space (GiB) on the spool's file system, stores fail
        with :class:`OutOfResourcesError`.
    resend_policy:
        ``replace``: an instance re-sent with other content under a stored SOP Instance UID replaces
        the stored copy (the study is re-opened and reprocessed); ``keep_first``: it is ignored.
    """

    def __init__(self, storage_dir: Path, disk_min_free_gb: float, *, resend_policy: str = "replace") -> None:
        self.storage_dir = Path(storage_dir)
        self.resend_policy = resend_policy
        self.root = self.storage_dir / "spool"
        self.tmp_dir = self.root / ".tmp"
        self.disk_min_free_gb = float(disk_min_free_gb)
        self.db_path = store.db_path(self.storage_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dev = os.stat(self.tmp_dir).st_dev
        store.ensure(self.db_path)

    # ------------------------------------------------------------------ helpers

    @property
    def _conn(self) -> sqlite3.Connection:
        return store.thread_connection(self.db_path)

    def free_gb(self) -> float:
        """Free space on the spool's file system in GiB."""
        return shutil.disk_usage(self.root).free / _GIB

    def disk_ok(self) -> bool:
        """True when free space is at least ``disk_min_free_gb``."""
        try:
            return self.free_gb() >= self.disk_min_free_gb
        except OSError:
            return False

    @staticmethod
    def _parse(fp: BinaryIO, dataset_offset: int | None = None) -> tuple[pydicom.Dataset, str]:
        """Parse the header (no pixel data) and check the data set is complete; return it and its transfer syntax.

        ``dataset_offset``: where the data set starts, when the caller wrote the File Meta Information itself
        (the native receiver); otherwise it is found and checked by :func:`dicomnode.filemeta.seek_dataset`.
        """
        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            ts = str(ds.file_meta.get("TransferSyntaxUID") or "")
            meta_sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
            if meta_sop is not None and "SOPInstanceUID" not in ds:
                ds.SOPInstanceUID = meta_sop
            if dataset_offset is None:
                seek_dataset(fp)
            else:
                fp.seek(dataset_offset)
        except Exception as exc:  # noqa: BLE001 - anything pydicom raises means "cannot parse"
            raise InvalidDatasetError(f"cannot parse received dataset: {type(exc).__name__}: {exc}") from exc
        check_complete(fp, ts)
        return ds, ts

    def _take_input(self, encoded: bytes | bytearray | memoryview | str | os.PathLike[str]) -> Path:
        """Materialise ``encoded`` as a fsynced file inside ``tmp_dir`` and return its path."""
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            if isinstance(encoded, bytes | bytearray | memoryview):
                with open(tmp, "wb") as f:
                    f.write(encoded)
                    f.flush()
                    os.fsync(f.fileno())
                return tmp
            src = Path(encoded)
            if os.stat(src).st_dev == self._tmp_dev:
                # Same file system: fsync the received file and move it, no copy.
                fsync_path(src)
                os.replace(src, tmp)
                return tmp
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, _COPY_CHUNK)
                fout.flush()
                os.fsync(fout.fileno())
            return tmp
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot write to spool: {exc}") from exc

    # ------------------------------------------------------------------ store

    def identify(self, encoded: bytes | bytearray | memoryview | str | os.PathLike[str], *,
                 dataset_offset: int | None = None) -> Identity:
        """Parse and check a received instance (File Format bytes or a path) as :meth:`store` would.

        ``dataset_offset`` is where the data set starts when the caller wrote the File Meta Information.

        Raises
        ------
        InvalidDatasetError
            The data cannot be parsed or lacks valid Study/Series/SOP Instance UIDs.
        OutOfResourcesError
            A path that cannot be read.
        """
        if isinstance(encoded, bytes | bytearray | memoryview):
            return self._identify(io.BytesIO(encoded), dataset_offset)
        try:
            with open(encoded, "rb") as fp:
                return self._identify(fp, dataset_offset)
        except OSError as exc:
            raise OutOfResourcesError(f"cannot read received file {encoded}: {exc}") from exc

    def store(self, encoded: bytes | str | os.PathLike[str], *, assoc_id: str | None,
              ident: Identity | None = None) -> StoreOutcome:
        """Persist one received instance (DICOM File Format bytes, or a path to such a file).

        A path given here is moved into the spool when the instance is stored and the
        path lies on the spool's file system; otherwise it is copied and left in place
        (as it is for duplicates) for the caller to delete. ``ident`` skips the parse
        when the caller already ran :meth:`identify`. A SOP Instance UID stored before
        gives DUPLICATE (same data set), or REPLACED / RESEND_IGNORED by ``resend_policy``.

        Raises
        ------
        OutOfResourcesError
            Free disk below the minimum, or the write / index update failed.
        InvalidDatasetError
            The data cannot be parsed or lacks valid Study/Series/SOP Instance UIDs.
        """
        if not self.disk_ok():
            raise OutOfResourcesError(
                f"free disk space below {self.disk_min_free_gb:g} GiB on {self.root}")
        ident = ident or self.identify(encoded)
        conn = self._conn
        if ReceiveRepo(conn).has_instance(ident.sop):
            return self._store_again(ident, encoded, assoc_id)
        tmp = self._take_input(encoded)
        final = self._final_path(ident)
        self._place(tmp, final)
        try:
            with store.transaction(conn):
                outcome = self._index(conn, ident, final, assoc_id, time.time())
        except sqlite3.Error as exc:
            raise OutOfResourcesError(f"cannot index instance {ident.sop}: {exc}") from exc
        log.debug("stored %s in series %s", ident.sop, ident.series)
        return outcome

    def _place(self, tmp: Path, final: Path) -> None:
        """Rename a fsynced temp file to ``final`` and make the directory entries durable."""
        try:
            created = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_path(final.parent)
            if created:
                fsync_path(final.parent.parent)
                fsync_path(self.root)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot move instance into spool: {exc}") from exc

    def _store_again(self, ident: Identity, encoded: bytes | bytearray | str | os.PathLike[str],
                     assoc_id: str | None) -> StoreOutcome:
        """A SOP Instance UID that is already stored: duplicate, replacement or ignored re-send."""
        conn = self._conn
        row = ReceiveRepo(conn).instance(ident.sop)
        if row is None:  # deleted meanwhile (retention): store as new
            return self.store(encoded, assoc_id=assoc_id, ident=ident)
        old = self.storage_dir / row["path"]
        if _digest(encoded) == _digest(old):
            log.info("duplicate instance %s ignored", ident.sop)
            return StoreOutcome.DUPLICATE
        if self.resend_policy == "keep_first":
            log.info("instance %s re-sent with different content; kept the first copy (resend_policy keep_first)",
                     ident.sop)
            return StoreOutcome.RESEND_IGNORED
        tmp = self._take_input(encoded)
        final = self._final_path(ident, unique=True)
        self._place(tmp, final)
        now = time.time()
        try:
            with store.transaction(conn):
                self._unindex(conn, row, now)
                self._index(conn, ident, final, assoc_id, now)
        except sqlite3.Error as exc:
            final.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot index instance {ident.sop}: {exc}") from exc
        if old != final:
            old.unlink(missing_ok=True)
        log.info("instance %s re-sent with different content: replaced the stored copy; study %s re-opens",
                 ident.sop, ident.study)
        return StoreOutcome.REPLACED

    def _unindex(self, conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
        """Remove an instance row being replaced (in the caller's transaction); its series is touched."""
        ReceiveRepo(conn).remove_instance(row["sop_instance_uid"], row["series_uid"], now)

    def store_batch(self, items: list[tuple[Any, str | None]] | list[tuple[Any, str | None, Identity | None]]
                    ) -> list[StoreOutcome | InvalidDatasetError]:
        """Persist several instances (File Format bytes, association id[, identity]) with one sync and one commit.

        The bytes may also be an object with ``copy_to(fd)`` and ``bytes()`` (a
        :class:`dicomnode.journal.JournalPayload`): the kernel then copies it into the spool file.

        Each file is written and renamed into place without its own fsync; one flush
        (:func:`_sync_filesystem`) then makes all of them (and their directories) durable before a single
        transaction indexes them. An item that cannot be parsed gets its InvalidDatasetError in the
        result list and does not stop the others. SOP Instance UIDs already stored (or repeated in
        the batch) go through :meth:`store` one by one afterwards (duplicate or re-send).

        Raises
        ------
        OutOfResourcesError
            Free disk below the minimum, or a write, the sync or the index update failed (nothing indexed).
        """
        if not self.disk_ok():
            raise OutOfResourcesError(f"free disk space below {self.disk_min_free_gb:g} GiB on {self.root}")
        conn = self._conn
        results: list[StoreOutcome | InvalidDatasetError] = []
        placed: list[tuple[int, Identity, Path, str | None]] = []
        again: list[tuple[int, Any, Identity, str | None]] = []
        seen: set[str] = set()
        try:
            for k, (data, assoc_id, *rest) in enumerate(items):
                try:
                    ident = rest[0] if rest and rest[0] is not None else self._identify(io.BytesIO(bytes(data)))
                except InvalidDatasetError as exc:
                    results.append(exc)
                    continue
                results.append(StoreOutcome.STORED)
                if ident.sop in seen or ReceiveRepo(conn).has_instance(ident.sop):
                    again.append((k, data, ident, assoc_id))
                    continue
                seen.add(ident.sop)
                placed.append((k, ident, self._place_unsynced(ident, data), assoc_id))
            if placed:
                _sync_filesystem(self.root, [p for _, _, p, _ in placed])
        except OSError as exc:
            raise OutOfResourcesError(f"cannot write instances into the spool: {exc}") from exc
        now = time.time()
        try:
            with store.transaction(conn):
                for k, ident, final, assoc_id in placed:
                    results[k] = self._index(conn, ident, final, assoc_id, now)
        except sqlite3.Error as exc:
            raise OutOfResourcesError(f"cannot index {len(placed)} instances: {exc}") from exc
        for k, data, ident, assoc_id in again:
            results[k] = self._store_again(ident, bytes(data), assoc_id)
        return results

    def _place_unsynced(self, ident: Identity, data: Any) -> Path:
        """Write ``data`` (bytes or a ``copy_to(fd)`` payload) to its final spool path, without fsync.

        The caller makes it durable (:func:`_sync_filesystem`) before indexing it. Raises OSError.
        """
        final = self._final_path(ident)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            if hasattr(data, "copy_to"):
                data.copy_to(f.fileno())
            else:
                f.write(data)
        os.replace(tmp, final)
        return final

    def _identify(self, fp: BinaryIO, dataset_offset: int | None = None) -> _Identity:
        """Parse and check a received file; its UIDs, transfer syntax and routing attributes."""
        ds, ts = self._parse(fp, dataset_offset)
        try:
            sop = _valid_uid(ds.get("SOPInstanceUID"))
            sop_class = _valid_uid(ds.get("SOPClassUID")) or _valid_uid(ds.file_meta.get("MediaStorageSOPClassUID"))
            study = _valid_uid(ds.get("StudyInstanceUID"))
            series = _valid_uid(ds.get("SeriesInstanceUID"))
            meta = routing_meta(ds)
        except Exception as exc:  # noqa: BLE001 - malformed element values
            raise InvalidDatasetError(f"cannot read UIDs from received dataset: {exc}") from exc
        missing = [n for n, v in (("SOPInstanceUID", sop), ("SOPClassUID", sop_class),
                                  ("StudyInstanceUID", study), ("SeriesInstanceUID", series)) if v is None]
        if missing:
            raise InvalidDatasetError(f"received dataset lacks valid {', '.join(missing)}")
        assert sop and sop_class and study and series
        return _Identity(sop, sop_class, study, series, ts, meta)

    def _final_path(self, ident: Identity, *, unique: bool = False) -> Path:
        """``<study>/<series>/<sop>.dcm``; ``unique`` adds a random part (a replacement beside the old copy)."""
        name = f"{ident.sop}.{uuid.uuid4().hex[:12]}.dcm" if unique else f"{ident.sop}.dcm"
        return self.root / ident.study / ident.series / name

    def _index(self, conn: sqlite3.Connection, ident: _Identity, final: Path, assoc_id: str | None,
               now: float) -> StoreOutcome:
        """Index rows of one placed instance (inside the caller's transaction)."""
        repo = ReceiveRepo(conn)
        if not repo.insert_instance(ident.sop, ident.sop_class, ident.study, ident.series,
                                    str(final.relative_to(self.storage_dir)), ident.transfer_syntax, now, assoc_id):
            return StoreOutcome.DUPLICATE
        meta, series = ident.meta, ident.series
        stored = repo.series_meta(series)
        if stored is None:
            repo.insert_series(series, ident.study, meta, now, _expected_from_header(meta))
        else:
            views = set(stored.get("view_positions") or ())
            merged = None
            if not set(meta["view_positions"]) <= views:
                merged = {**stored, "view_positions": sorted(views | set(meta["view_positions"]))}
            repo.add_to_series(series, now, merged)
        if assoc_id is not None:
            repo.count_stored(assoc_id)
        return StoreOutcome.STORED

    # ------------------------------------------------------------------ temp files

    def clean_tmp(self) -> int:
        """Delete partial files left in the spool's temp folder by a crash (call before receiving)."""
        n = 0
        for f in self.tmp_dir.iterdir():
            if f.is_file():
                f.unlink(missing_ok=True)
                n += 1
        if n:
            log.warning("removed %d partial file(s) left in %s", n, self.tmp_dir)
        return n

    # ------------------------------------------------------------------ queries

    def series_records(self, study_uid: str | None = None) -> list[SeriesRecord]:
        """Spooled series, all or of one study, oldest first."""
        rows = ReceiveRepo(self._conn).series_rows(study_uid)
        return [SeriesRecord(r["series_uid"], r["study_uid"], json.loads(r["meta_json"]), r["n_instances"],
                             r["first_received"], r["last_received"], r["expected_count"]) for r in rows]

    def instances(self, study_uid: str, series_uid: str | None = None) -> list[StoredInstance]:
        """Spooled instances of a study (or one series), in arrival order, with absolute paths."""
        rows = ReceiveRepo(self._conn).instance_rows(study_uid, series_uid)
        return [StoredInstance(r["sop_instance_uid"], r["sop_class_uid"], r["study_uid"], r["series_uid"],
                               self.storage_dir / r["path"], r["received_at"]) for r in rows]

    def studies_received_since(self, ts: float) -> list[str]:
        """Study UIDs with an instance received at or after ``ts``."""
        return ReceiveRepo(self._conn).studies_received_since(ts)

    def delete_study(self, study_uid: str) -> int:
        """Delete a study's files and index rows (retention); returns the number of instances removed."""
        if _valid_uid(study_uid) is None:
            raise InvalidDatasetError(f"not a valid Study Instance UID: {study_uid!r}")
        conn = self._conn
        with store.transaction(conn):
            n = ReceiveRepo(conn).delete_study(study_uid)
        shutil.rmtree(self.root / study_uid, ignore_errors=True)
        log.info("deleted study %s from the spool (%d instances)", study_uid, n)
        return n
