"""Quarantine: acknowledged instances the node could not index, kept for the operator and never lost from view.

An instance is quarantined only after the sender was told "stored" and the spool then
refused it (a journal record written by an older version that no longer parses, say):
its bytes go to ``<storage_dir>/quarantine/<id>.dcm`` (fsynced) and a row to the
``quarantine`` table. ``dicomnode status``, the status page and the
``dicomnode_quarantined_instances`` gauge list every row whose file is still there;
the operator fixes or re-imports the file and then deletes it (README, "Quarantined
instances"), which clears the flag.

Its table, ``quarantine``, is written only through :class:`dicomnode.store.QuarantineRepo`.
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_partial

from dicomnode import store
from dicomnode.fsutil import fsync_path
from dicomnode.store import QuarantineRepo

log = logging.getLogger(__name__)

__all__ = ["QuarantinedInstance", "list_quarantined", "quarantine", "quarantined_from_rows"]

_REASON_MAX = 300


@dataclass(frozen=True)
class QuarantinedInstance:
    """One quarantined instance whose file is still in the quarantine folder."""

    id: int
    path: Path
    kind: str
    reason: str
    sop_instance_uid: str | None
    acknowledged: bool
    quarantined_at: float


def quarantine(storage_dir: Path, payload: bytes, *, kind: str, reason: str, sop_instance_uid: str | None = None,
               assoc_id: str | None = None, acknowledged: bool = True) -> Path:
    """Keep ``payload`` under ``<storage_dir>/quarantine`` (durably) and record why; returns the file.

    ``kind`` is a short fixed word (metrics label); ``reason`` the error text (no tag values, cut to 300 chars).
    """
    storage_dir = Path(storage_dir)
    sop_instance_uid = sop_instance_uid or _meta_sop(payload)
    qdir = storage_dir / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    target = qdir / f"{uuid.uuid4().hex}.dcm"
    with open(target, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(qdir)
    path = store.db_path(storage_dir)
    store.ensure(path)
    conn = store.connect(path)
    try:
        QuarantineRepo(conn).add(str(target.relative_to(storage_dir)), kind, reason[:_REASON_MAX], sop_instance_uid,
                                 assoc_id, acknowledged)
    finally:
        conn.close()
    log.error("acknowledged instance cannot be indexed (%s: %s); kept as %s", kind, reason[:_REASON_MAX], target)
    return target


def _meta_sop(payload: bytes) -> str | None:
    """The Media Storage SOP Instance UID of the file meta (the C-STORE's), if it can be read."""
    try:
        value = read_partial(io.BytesIO(payload), stop_when=lambda *_: True).file_meta.get("MediaStorageSOPInstanceUID")
    except Exception:  # noqa: BLE001 - a payload too broken for that is listed without a UID
        return None
    return str(value) if value else None


def list_quarantined(conn: sqlite3.Connection, storage_dir: Path) -> list[QuarantinedInstance]:
    """Quarantined instances whose file the operator has not removed yet, newest first."""
    return quarantined_from_rows(QuarantineRepo(conn).rows(), storage_dir)


def quarantined_from_rows(rows: list[sqlite3.Row], storage_dir: Path) -> list[QuarantinedInstance]:
    """The quarantine rows whose file is still present, in the given order."""
    out = []
    for r in rows:
        path = Path(storage_dir) / r["path"]
        if path.exists():
            out.append(QuarantinedInstance(int(r["id"]), path, r["kind"], r["reason"], r["sop_instance_uid"],
                                           bool(r["acknowledged"]), float(r["quarantined_at"])))
    return out
