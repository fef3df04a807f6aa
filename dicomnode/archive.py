"""De-identified training archive: the node keeps a pseudonymised copy of each processed series.

Only routes with ``archive_for_training: true`` are archived. Every dataset is
de-identified by pydicom's ``deid`` library with the DICOM PS3.15 Annex E *Basic
Application Level Confidentiality Profile* plus the *Retain Longitudinal Temporal
Information with Modified Dates* and *Retain Patient Characteristics* options
(:mod:`dicomnode.deid_profile`, which turns Table E.1-1 into a ``deid`` recipe):

* private attributes, overlays and curves are removed;
* every attribute of PS3.15 Table E.1-1 gets its action (removed, emptied, dummy,
  UID replaced, kept or date-shifted), in sequence items too; every other person
  name (PN) is emptied, and free text that quotes the patient's name, ID, birth
  date or an original UID is removed;
* every UID that is not a DICOM-defined one (``1.2.840.10008.*``), in every
  sequence item and in the file meta, is replaced by ``2.25.<HMAC-SHA256(key, uid)>``
  so references between objects stay consistent across studies and restarts;
* PatientID and PatientName become ``PSN<HMAC(key, patient id)>``, the same for
  every study of that patient; PatientBirthDate is emptied (PatientAge is kept
  or filled in from it);
* every DA/DT value is shifted by a per-patient number of days (1 to 3650, from
  the HMAC), so intervals between one patient's studies are preserved;
* an image flagged Burned In Annotation YES is refused (no Clean Pixel Data).

Layout: :mod:`inference.archive_format` (shared with the training side, which does
not import this package).

Only pseudonymous values are stored under ``archive_dir``; the key and the
mapping back to original identifiers live under ``key_dir`` (keep it on a
different path, readable only by the node's user). ``series.json`` never holds
an original identifier. The archive has a size cap: after each addition the
oldest series (by ``archived_at``) are evicted until the total is below it.
"""

from __future__ import annotations

import copy
import datetime as _dt
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence

from dicomnode.config import Config, Route
from dicomnode.deid_profile import DEID_CODES, DEID_METHOD, apply_profile
from dicomnode.errors import DicomNodeError
from inference.ages import age_in_years, age_string
from inference.archive_format import (
    FORMAT,
    KEY_FILE,
    MAPPED_KINDS,
    SIDECAR,
    STUDIES,
    UID_MAP,
    read_uid_map,
    sidecars,
)
from inference.fsutil import replace_dir

log = logging.getLogger(__name__)

__all__ = [
    "ArchiveError", "ArchivedSeries", "Deidentifier", "TrainingArchive", "archive_series", "training_archive_for",
]

DICOM_UID_ROOT = "1.2.840.10008."

_SKIP_UID_KEYWORDS = frozenset({"TransferSyntaxUID", "ImplementationClassUID"})


class ArchiveError(DicomNodeError):
    """A series cannot be archived (unreadable input, burned-in annotation, key or disk problem)."""


@dataclass(frozen=True)
class ArchivedSeries:
    """Where one series went, with pseudonymous identifiers only."""

    directory: Path
    study_uid: str
    series_uid: str
    patient_id: str
    n_files: int
    bytes: int


def _secure_write_new(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 if it does not exist; False if someone else created it first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


class Deidentifier:
    """Keyed, deterministic de-identification of datasets (PS3.15 Basic Profile with the options above).

    Parameters
    ----------
    key:
        Secret HMAC key; the same key gives the same pseudonyms.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ArchiveError("the pseudonymisation key must be at least 16 bytes")
        self._key = key
        self.mapped: dict[tuple[str, str], str] = {}  # (kind, original) -> pseudo, for the key mapping file

    def _digest(self, domain: str, value: str) -> bytes:
        return hmac.new(self._key, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """Pseudonymous UID of ``original`` (``2.25.`` + 128 bits of the HMAC)."""
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def patient_id(self, original: str) -> str:
        """Pseudonymous patient ID (``PSN`` + 16 hex digits)."""
        return "PSN" + self._digest("patient", original).hex()[:16].upper()

    def date_shift_days(self, patient_key: str) -> int:
        """Days (1..3650) every date of this patient is moved back."""
        return 1 + int.from_bytes(self._digest("date", patient_key)[:4], "big") % 3650

    def deidentify(self, ds: Dataset) -> Dataset:
        """Return a de-identified copy of ``ds`` (pixel data untouched).

        Raises
        ------
        ArchiveError
            If the image has burned-in annotation (the Basic Profile needs the Clean Pixel Data option).
        """
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            raise ArchiveError("image has burned-in annotation; not archived (Clean Pixel Data is not implemented)")
        out = copy.deepcopy(ds)
        orig_pid = str(ds.get("PatientID", "") or "") or f"study:{ds.get('StudyInstanceUID', '')}"
        name = str(ds.get("PatientName", "") or "")
        quoted = [s for s in {orig_pid, str(ds.get("PatientID", "") or ""), name, *name.split("^"),
                              str(ds.get("PatientBirthDate", "") or ""), *_uids(ds)} if len(s) >= 3]
        age = str(ds.get("PatientAge", "") or "") or _age(ds)
        for kind in MAPPED_KINDS:
            if kind in ds:
                self.mapped[(kind, str(ds[kind].value))] = self.uid(str(ds[kind].value))
        pseudo_pid = self.patient_id(orig_pid)
        self.mapped[("PatientID", orig_pid)] = pseudo_pid
        out = apply_profile(out, uid=self._map_uid, shift_days=-self.date_shift_days(orig_pid), quoted=quoted)
        meta = getattr(out, "file_meta", None)
        if meta is not None:
            for elem in meta:
                if elem.VR == "UI" and elem.value and elem.keyword not in _SKIP_UID_KEYWORDS:
                    elem.value = self._map_uid(str(elem.value))
        out.PatientID = pseudo_pid
        out.PatientName = pseudo_pid
        out.PatientBirthDate = ""
        if age:
            out.PatientAge = age
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        out.DeidentificationMethod = DEID_METHOD
        items = []
        for value, meaning in DEID_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        out.DeidentificationMethodCodeSequence = DicomSequence(items)
        return out

    def _map_uid(self, value: str) -> str:
        return value if value.startswith(DICOM_UID_ROOT) else self.uid(value)


def _uids(ds: Dataset) -> set[str]:
    """Every non-DICOM UID value in ``ds`` (free text quoting one of them is dropped too)."""
    found: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
            found.update(str(v) for v in values if not str(v).startswith(DICOM_UID_ROOT))
    return found


def _age(ds: Dataset) -> str:
    """PatientAge (DICOM AS) from BirthDate and StudyDate, or '' if unknown."""
    try:
        b = _dt.datetime.strptime(str(ds.PatientBirthDate)[:8], "%Y%m%d").date()
        s = _dt.datetime.strptime(str(ds.StudyDate)[:8], "%Y%m%d").date()
    except (AttributeError, ValueError):
        return ""
    years = age_in_years(b, s)
    return age_string(years) if years is not None else ""


class TrainingArchive:
    """The de-identified archive of one node, with its key directory and size cap.

    Parameters
    ----------
    archive_dir:
        Pseudonymised series (see the module docstring for the layout).
    key_dir:
        Secret key and UID mapping (mode 0700 folder, 0600 files), kept apart from ``archive_dir``.
    max_bytes:
        Size cap; the oldest series are evicted first when it is exceeded.
    """

    def __init__(self, archive_dir: str | PathLike[str], key_dir: str | PathLike[str], max_bytes: int) -> None:
        self.root = Path(archive_dir)
        self.key_dir = Path(key_dir)
        self.max_bytes = int(max_bytes)
        if self.key_dir.resolve() == self.root.resolve() or self.key_dir.resolve().is_relative_to(self.root.resolve()):
            raise ArchiveError("the key directory must not lie inside the training archive")
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.key_dir, 0o700)
        self.deid = Deidentifier(self._key())
        self._known: set[tuple[str, str]] = set()
        self._load_map()

    @property
    def studies_dir(self) -> Path:
        """Folder of the pseudonymised studies."""
        return self.root / STUDIES

    def _key(self) -> bytes:
        path = self.key_dir / KEY_FILE
        _secure_write_new(path, secrets.token_hex(32).encode())
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        try:
            return bytes.fromhex(path.read_text(encoding="ascii").strip())
        except ValueError as exc:
            raise ArchiveError(f"pseudonymisation key {path} is corrupt") from exc

    def _load_map(self) -> None:
        self._known.update(read_uid_map(self.key_dir))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock, open(self.key_dir / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _append_map(self) -> None:
        new = [(k, o, p) for (k, o), p in self.deid.mapped.items() if (k, o) not in self._known]
        self.deid.mapped.clear()
        if not new:
            return
        path = self.key_dir / UID_MAP
        _secure_write_new(path, b"")
        with open(path, "a", encoding="utf-8") as f:
            for k, o, p in new:
                f.write(json.dumps({"kind": k, "original": o, "pseudo": p}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._known.update((k, o) for k, o, _ in new)

    def archive_series(self, datasets_or_paths: Sequence[Dataset | str | PathLike[str]], route: Route) -> list[ArchivedSeries]:
        """De-identify and store the given instances, one folder per series; then enforce the size cap.

        Raises
        ------
        ArchiveError
            If an input cannot be read or de-identified; nothing of that series is kept.
        """
        datasets = [_read(s) for s in datasets_or_paths]
        by_series: dict[str, list[Dataset]] = {}
        for ds in datasets:
            by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
        done = []
        with self._locked():
            for group in by_series.values():
                done.append(self._store(group, route))
            self._append_map()
            self.enforce_cap()
        return done

    def _store(self, group: list[Dataset], route: Route) -> ArchivedSeries:
        clean = [self.deid.deidentify(ds) for ds in group]
        first = clean[0]
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        dest = self.studies_dir / study / series
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{series}.", suffix=".tmp", dir=dest.parent))
        try:
            names, total = [], 0
            if dest.is_dir():  # a re-processed series: keep earlier instances, add or replace the new ones
                for f in dest.glob("*.dcm"):
                    shutil.copy2(f, tmp / f.name)
            for ds in clean:
                name = f"{ds.SOPInstanceUID}.dcm"
                ds.save_as(tmp / name, enforce_file_format=True)
            for f in sorted(tmp.glob("*.dcm")):
                names.append(f.name)
                total += f.stat().st_size
            sidecar = {"format": FORMAT, "study_uid": study, "series_uid": series, "patient_id": str(first.PatientID),
                       "task": route.task, "route": route.name, "modality": str(first.get("Modality", "")),
                       "archived_at": time.time(), "bytes": total, "files": names}
            (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1), encoding="utf-8")
            replace_dir(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("archived a de-identified series (%d instances, %d bytes) for task %s", len(names), total, route.task)
        return ArchivedSeries(dest, study, series, str(first.PatientID), len(names), total)

    def entries(self) -> list[dict[str, Any]]:
        """Sidecars of every archived series, oldest first (each with its ``directory``)."""
        out = []
        for folder, obj in sidecars(self.root):
            obj["directory"] = str(folder)
            out.append(obj)
        return sorted(out, key=lambda o: float(o.get("archived_at", 0)))

    def total_bytes(self) -> int:
        """Bytes of every archived series (from the sidecars)."""
        return sum(int(e.get("bytes", 0)) for e in self.entries())

    def enforce_cap(self) -> list[str]:
        """Evict the oldest series until the archive fits ``max_bytes``; return evicted series UIDs."""
        entries = self.entries()
        total = sum(int(e.get("bytes", 0)) for e in entries)
        evicted = []
        for e in entries:
            if total <= self.max_bytes:
                break
            d = Path(e["directory"])
            shutil.rmtree(d, ignore_errors=True)
            try:
                d.parent.rmdir()  # the study folder, once its last series is gone
            except OSError:
                pass
            total -= int(e.get("bytes", 0))
            evicted.append(str(e.get("series_uid")))
        if evicted:
            log.info("training archive over its cap: evicted %d oldest series", len(evicted))
        return evicted


def _read(source: Dataset | str | PathLike[str]) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
        raise ArchiveError(f"cannot read {source}: {exc}") from exc


def training_archive_for(cfg: Config) -> TrainingArchive:
    """The archive configured for this node (``training_archive`` section, defaults under ``storage_dir``)."""
    ta = cfg.training_archive
    root = ta.dir or cfg.node.storage_dir / "training-archive"
    keys = ta.key_dir or cfg.node.storage_dir / "training-archive-keys"
    return TrainingArchive(root, keys, int(ta.max_gb * 1024**3))


_ARCHIVES: dict[tuple[str, str], TrainingArchive] = {}
_ARCHIVES_LOCK = threading.Lock()


def archive_series(datasets_or_paths: Sequence[Dataset | str | PathLike[str]], route: Route,
                   cfg: Config) -> list[ArchivedSeries]:
    """Archive a processed series for ``route`` if it opted in (``archive_for_training``); else do nothing."""
    if not route.archive_for_training:
        return []
    ta = cfg.training_archive
    key = (str(ta.dir or cfg.node.storage_dir / "training-archive"),
           str(ta.key_dir or cfg.node.storage_dir / "training-archive-keys"))
    with _ARCHIVES_LOCK:
        arch = _ARCHIVES.get(key)
        if arch is None:
            arch = _ARCHIVES[key] = training_archive_for(cfg)
    return arch.archive_series(datasets_or_paths, route)
