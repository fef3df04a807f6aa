"""Attributes every result object shares: identity, naming, equipment, creation time.

Patient and study attributes always come from the source images (highdicom
copies the Patient, General Study and Patient Study modules); nothing here
invents them. Type 2 attributes the source lacks are written empty.
"""

from __future__ import annotations

import copy
import datetime
import logging
from collections.abc import Iterable, Sequence

import highdicom as hd
from pydicom import Dataset

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from inference.findings import Findings, ImageRef

log = logging.getLogger(__name__)

KINDS = ("sr", "seg", "sc")
_KIND_LABEL = {"sr": "SR", "seg": "SEG", "sc": "SC"}
_SERIES_NUMBER_OFFSET = {"sr": 0, "seg": 1, "sc": 2}
DEFAULT_SERIES_NUMBER_START = 9000

# Type 2 attributes highdicom reads from the first source image.
_TYPE2_PATIENT_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_REQUIRED_SOURCE = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def series_description(task: str, kind: str, version: str) -> str:
    """Stable series description such as ``"AI wrist_fracture SR v1.2"`` (at most 64 characters)."""
    text = f"AI {task} {_KIND_LABEL[kind]} v{version}"
    return text[:64]


def series_uid(context: ResultContext, kind: str) -> str:
    """The result series UID for ``kind``; a new one is created and stored in ``context`` if absent.

    The node persists ``context.series_uids`` after a build so that a re-run
    writes into the same series.
    """
    uid = context.series_uids.get(kind)
    if not uid:
        uid = str(hd.UID())
        context.series_uids[kind] = uid
    return uid


def series_number(context: ResultContext, kind: str) -> int:
    """Series number for ``kind`` from the context, else a default in the 9000 range."""
    number = context.series_numbers.get(kind)
    if number is None:
        number = DEFAULT_SERIES_NUMBER_START + _SERIES_NUMBER_OFFSET[kind]
        context.series_numbers[kind] = number
    if number < 1:
        raise ResultWriteError(f"series number for {kind} must be positive, got {number}")
    return int(number)


def validate_sources(sources: Sequence[Dataset], findings: Findings) -> dict[str, Dataset]:
    """Check the sources belong to one study and cover every referenced image; index them by SOP UID.

    Raises
    ------
    ResultWriteError
        If sources are missing, lack identifying attributes, span several
        studies, or do not include an image the findings reference.
    """
    if not sources:
        raise ResultWriteError("no source images given to the result writers")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        missing = [kw for kw in _REQUIRED_SOURCE if not ds.get(kw)]
        if missing:
            raise ResultWriteError(f"source image lacks {', '.join(missing)}")
        by_uid[str(ds.SOPInstanceUID)] = ds
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ResultWriteError(f"source images span {len(studies)} studies; results need exactly one")
    if findings.study_instance_uid and findings.study_instance_uid not in studies:
        raise ResultWriteError("findings refer to a different study than the source images")
    missing_refs = [ref.sop_instance_uid for ref in _all_refs(findings) if ref.sop_instance_uid not in by_uid]
    if missing_refs:
        raise ResultWriteError(f"{len(set(missing_refs))} image(s) referenced by the findings are not among the sources")
    return by_uid


def _all_refs(findings: Findings) -> Iterable[ImageRef]:
    yield from findings.source_images
    for c in findings.classifications:
        yield from c.images
    for b in findings.boxes:
        yield b.image
    for m in findings.masks:
        yield from m.images
    for o in findings.overlays:
        yield from o.derived_from
        for p in o.panels:
            if p.image is not None:
                yield p.image
            for b in p.boxes:
                yield b.image


def header_for_copy(ds: Dataset) -> Dataset:
    """A pixel-less copy of ``ds`` whose missing Type 2 patient/study attributes are present and empty."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or elem.keyword in ("FloatPixelData", "DoubleFloatPixelData"):
            continue
        out.add(copy.deepcopy(elem))
    for kw in _TYPE2_PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, None)
    return out


def finish(ds: Dataset, source: Dataset, context: ResultContext, description: str) -> Dataset:
    """Set naming, equipment, character set and creation date/time on a built result object."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds.SeriesDescription = description
    ds.Manufacturer = context.manufacturer[:64]
    ds.ManufacturerModelName = context.model_name[:64]
    ds.SoftwareVersions = context.software_version[:64]
    if context.institution_name:
        ds.InstitutionName = context.institution_name[:64]
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.ContentDate, ds.ContentTime = date, time
    return ds


def sort_sources(sources: Iterable[Dataset]) -> list[Dataset]:
    """Sources in a stable order (series, then instance number, then SOP UID)."""

    def key(ds: Dataset) -> tuple[str, int, str]:
        try:
            inst = int(ds.get("InstanceNumber") or 0)
        except (TypeError, ValueError):
            inst = 0
        return (str(ds.SeriesInstanceUID), inst, str(ds.SOPInstanceUID))

    return sorted(sources, key=key)
