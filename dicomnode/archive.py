"""De-identified training archive: the node keeps a pseudonymised copy of each processed series.

Only routes with ``archive_for_training: true`` are archived. Every dataset is
de-identified with the DICOM PS3.15 Annex E *Basic Application Level
Confidentiality Profile* plus the *Retain Longitudinal Temporal Information
with Modified Dates*, *Retain Patient Characteristics* and *Clean Descriptors*
options:

* private attributes, overlays and curves are removed;
* the attributes of PS3.15 Table E.1-1 that identify people, places or devices
  are removed or emptied (``_REMOVE``/``_EMPTY``), every other person name (PN)
  is emptied, and free text that contains the patient's name or ID is removed;
* every UID that is not a DICOM-defined one (``1.2.840.10008.*``), in every
  sequence item and in the file meta, is replaced by ``2.25.<HMAC-SHA256(key, uid)>``
  so references between objects stay consistent across studies and restarts;
* PatientID and PatientName become ``PSN<HMAC(key, patient id)>``, the same for
  every study of that patient; PatientBirthDate is emptied (PatientAge is kept
  or filled in from it);
* every DA/DT value is shifted by a per-patient number of days (1 to 3650, from
  the HMAC), so intervals between one patient's studies are preserved.

Layout (the format the training side reads without importing this package)::

    <archive_dir>/studies/<study>/<series>/<sop>.dcm    pseudonymised files
    <archive_dir>/studies/<study>/<series>/series.json  {"format": 1, "study_uid", "series_uid",
        "patient_id", "task", "route", "modality", "archived_at" (UNIX s), "bytes", "files": [names]}
    <key_dir>/secret.key        32 random bytes (hex), mode 0600
    <key_dir>/uid_map.jsonl     mode 0600; one JSON object per line:
        {"kind": "StudyInstanceUID"|"SeriesInstanceUID"|"SOPInstanceUID"|"PatientID",
         "original": "...", "pseudo": "..."}

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
from dicomnode.errors import DicomNodeError

log = logging.getLogger(__name__)

__all__ = [
    "ArchiveError", "ArchivedSeries", "Deidentifier", "TrainingArchive", "archive_series", "training_archive_for",
]

FORMAT = 1
SIDECAR = "series.json"
KEY_FILE = "secret.key"
UID_MAP = "uid_map.jsonl"
DICOM_UID_ROOT = "1.2.840.10008."
MAPPED_KINDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# PS3.15 Table E.1-1 attributes removed (X) or, where the IOD needs them, emptied (Z); identifying by nature.
_REMOVE = frozenset({
    "AccessionNumber", "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "ActualHumanPerformersSequence",
    "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesCodeSequence", "AdmittingDiagnosesDescription",
    "Allergies", "Arbitrary", "AuthorObserverSequence", "BranchOfService", "CassetteID", "ConfidentialityConstraintOnPatientDataDescription",
    "ContentCreatorName", "ContributionDescription", "CountryOfResidence", "CurrentPatientLocation", "CustodialOrganizationSequence",
    "DataSetTrailingPadding", "DerivationDescription", "DetectorID", "DeviceSerialNumber", "DeviceUID", "DigitalSignaturesSequence",
    "DischargeDiagnosisDescription", "DistributionAddress", "DistributionName", "EthnicGroup", "FrameComments",
    "GantryID", "GeneratorID", "HumanPerformerName", "HumanPerformerOrganization", "IconImageSequence", "IdentifyingComments",
    "ImageComments", "ImagePresentationComments", "ImagingServiceRequestComments", "Impressions", "InstitutionAddress",
    "InstitutionalDepartmentName", "InstitutionCodeSequence", "InstitutionName", "InsurancePlanIdentification",
    "IntendedRecipientsOfResultsIdentificationSequence", "InterpretationApproverSequence", "InterpretationAuthor",
    "InterpretationDiagnosisDescription", "InterpretationIDIssuer", "InterpretationRecorder", "InterpretationText",
    "InterpretationTranscriber", "IssuerOfAdmissionID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "MedicalAlerts", "MedicalRecordLocator", "MilitaryRank", "ModifiedAttributesSequence", "ModifyingDeviceID",
    "ModifyingDeviceManufacturer", "NameOfPhysiciansReadingStudy", "NamesOfIntendedRecipientsOfResults", "Occupation",
    "OperatorIdentificationSequence", "OperatorsName", "OriginalAttributesSequence", "OrderCallbackPhoneNumber",
    "OrderEnteredBy", "OrderEntererLocation", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "ParticipantSequence", "PatientAddress", "PatientBirthName", "PatientBirthTime", "PatientComments",
    "PatientInstitutionResidence", "PatientInsurancePlanCodeSequence", "PatientMotherBirthName", "PatientReligiousPreference",
    "PatientSexNeutered", "PatientState", "PatientTelephoneNumbers", "PatientTelecomInformation", "PatientTransportArrangements",
    "PerformedLocation", "PerformedProcedureStepDescription", "PerformedProcedureStepID", "PerformedStationAETitle",
    "PerformedStationGeographicLocationCodeSequence", "PerformedStationName", "PerformedStationNameCodeSequence",
    "PerformingPhysicianIdentificationSequence", "PerformingPhysicianName", "PersonAddress", "PersonIdentificationCodeSequence",
    "PersonName", "PersonTelephoneNumbers", "PhysicianApprovingInterpretation", "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence", "PlateID", "PreMedication",
    "PregnancyStatus", "ReasonForStudy", "ReasonForTheImagingServiceRequest", "ReasonForTheRequestedProcedure",
    "ReferencedPatientAliasSequence", "ReferencedPatientPhotoSequence", "ReferencedPatientSequence", "ReferencedStudySequence",
    "ReferringPhysicianAddress", "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
    "RegionOfResidence", "RequestAttributesSequence", "RequestedContrastAgent", "RequestedProcedureComments",
    "RequestedProcedureID", "RequestedProcedureLocation", "RequestingPhysician", "RequestingService", "ResponsibleOrganization",
    "ResponsiblePerson", "ResultsComments", "ResultsDistributionListSequence", "ResultsIDIssuer", "ScheduledHumanPerformersSequence",
    "ScheduledPatientInstitutionResidence", "ScheduledPerformingPhysicianIdentificationSequence", "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepLocation", "ScheduledStationAETitle", "ScheduledStationGeographicLocationCodeSequence",
    "ScheduledStationName", "ScheduledStationNameCodeSequence", "ServiceEpisodeDescription", "ServiceEpisodeID",
    "SmokingStatus", "SourceApplicationEntityTitle", "SpecialNeeds", "StationName", "StudyComments", "TextComments",
    "TextString", "TopicAuthor", "TopicKeywords", "TopicSubject", "TopicTitle", "VerifyingObserverIdentificationCodeSequence",
    "VerifyingObserverName", "VerifyingOrganization", "VisitComments", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "ReferencedPerformedProcedureStepSequence",
})
_EMPTY = frozenset({
    "PatientBirthDate", "ReferringPhysicianName", "StudyID", "ContentCreatorName", "VerifyingObserverSequence",
    "ContrastBolusAgent", "AcquisitionContextSequence",
})
_FREE_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UT", "UC"})
_SKIP_UID_KEYWORDS = frozenset({"TransferSyntaxUID", "ImplementationClassUID"})
_DEID_METHOD = "PS3.15 E.1 Basic Profile; options 113107 113108 113105"  # LO: at most 64 chars
_DEID_CODES = (("113100", "Basic Application Confidentiality Profile"),
               ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
               ("113108", "Retain Patient Characteristics Option"),
               ("113105", "Clean Descriptors Option"))


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
        secrets_text = [s for s in {orig_pid, str(ds.get("PatientID", "") or ""), name, *name.split("^"),
                                    str(ds.get("PatientBirthDate", "") or ""), *_uids(ds)} if len(s) >= 3]
        shift = _dt.timedelta(days=-self.date_shift_days(orig_pid))
        age = str(ds.get("PatientAge", "") or "") or _age(ds)
        for kind in MAPPED_KINDS:
            if kind in ds:
                self.mapped[(kind, str(ds[kind].value))] = self.uid(str(ds[kind].value))
        pseudo_pid = self.patient_id(orig_pid)
        self.mapped[("PatientID", orig_pid)] = pseudo_pid
        self._clean(out, shift, secrets_text)
        if getattr(out, "file_meta", None) is not None:
            self._clean(out.file_meta, shift, secrets_text, meta=True)
        out.PatientID = pseudo_pid
        out.PatientName = pseudo_pid
        out.PatientBirthDate = ""
        if age:
            out.PatientAge = age
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        out.DeidentificationMethod = _DEID_METHOD
        items = []
        for value, meaning in _DEID_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        out.DeidentificationMethodCodeSequence = DicomSequence(items)
        return out

    def _clean(self, ds: Dataset, shift: _dt.timedelta, secrets_text: list[str], meta: bool = False) -> None:
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private or 0x5000 <= tag.group <= 0x50FF or 0x6000 <= tag.group <= 0x60FF or elem.VR == "UN":
                del ds[tag]
                continue
            kw = elem.keyword
            if kw in _REMOVE:
                del ds[tag]
                continue
            if kw in _EMPTY:
                ds[tag].value = DicomSequence([]) if elem.VR == "SQ" else ""
                continue
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self._clean(item, shift, secrets_text)
                continue
            if elem.value is None or elem.value == "":
                continue
            if elem.VR == "UI":
                if kw not in _SKIP_UID_KEYWORDS:
                    elem.value = _map_multi(elem.value, self._map_uid)
            elif elem.VR == "PN" and kw != "PatientName":
                elem.value = ""
            elif elem.VR == "DA":
                elem.value = _map_multi(elem.value, lambda v: _shift_da(v, shift))
            elif elem.VR == "DT":
                elem.value = _map_multi(elem.value, lambda v: _shift_dt(v, shift))
            elif elem.VR in _FREE_TEXT_VRS and _contains(elem.value, secrets_text):
                # Clean Descriptors: a descriptor naming the patient is dropped, whatever its keyword
                del ds[tag]

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


def _map_multi(value: Any, fn: Any) -> Any:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _contains(value: Any, needles: list[str]) -> bool:
    text = str(value).upper()
    return any(n.upper() in text for n in needles)


def _shift_da(value: str, shift: _dt.timedelta) -> str:
    v = value.strip()
    try:
        return (_dt.datetime.strptime(v[:8], "%Y%m%d") + shift).strftime("%Y%m%d")
    except ValueError:
        return ""  # a date we cannot parse cannot be shifted safely: drop it


def _shift_dt(value: str, shift: _dt.timedelta) -> str:
    v = value.strip()
    if len(v) < 8:
        return ""
    d = _shift_da(v[:8], shift)
    return d + v[8:] if d else ""


def _age(ds: Dataset) -> str:
    """PatientAge (``nnnY``) from BirthDate and StudyDate, or '' if unknown."""
    try:
        b = _dt.datetime.strptime(str(ds.PatientBirthDate)[:8], "%Y%m%d").date()
        s = _dt.datetime.strptime(str(ds.StudyDate)[:8], "%Y%m%d").date()
    except (AttributeError, ValueError):
        return ""
    years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    return f"{years:03d}Y" if 0 <= years < 1000 else ""


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
        return self.root / "studies"

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
        path = self.key_dir / UID_MAP
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
                self._known.add((obj["kind"], obj["original"]))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash; the entry is written again on next use

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
            if dest.exists():
                old = dest.with_name(f".{series}.old")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("archived a de-identified series (%d instances, %d bytes) for task %s", len(names), total, route.task)
        return ArchivedSeries(dest, study, series, str(first.PatientID), len(names), total)

    def entries(self) -> list[dict[str, Any]]:
        """Sidecars of every archived series, oldest first (each with its ``directory``)."""
        out = []
        for side in self.studies_dir.glob(f"*/*/{SIDECAR}"):
            try:
                obj = json.loads(side.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            obj["directory"] = str(side.parent)
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
