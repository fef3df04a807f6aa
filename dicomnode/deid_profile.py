"""PS3.15 Annex E de-identification of one dataset, done by pydicom's ``deid`` library.

The profile is the *Basic Application Level Confidentiality Profile* with the *Retain Patient Characteristics*
(113108) and *Retain Longitudinal Temporal Information with Modified Dates* (113107) options. Its attribute list is
PS3.15 Table E.1-1, kept as data in ``data/ps315_table_e1_1.tsv`` (source cited there), and turned into a ``deid``
recipe (:func:`recipe_text`); ``deid`` walks every element, sequence items included, and applies it. The action
codes of Table E.1-1a become:

* ``X`` REMOVE; ``Z`` BLANK (the element stays, empty: Type 2 attributes such as Accession Number remain);
* ``X/Z``, ``Z/D``, ``X/Z/D``: BLANK (empty satisfies both Type 2 and Type 3);
* ``D`` and ``X/D``: REPLACE with a dummy value of the element's VR; a sequence becomes empty;
* ``U``: REPLACE with the keyed pseudonymous UID; ``X/Z/U*`` (sequences of references): kept, the rules below
  clean their items;
* option ``K``: KEEP; option ``C`` of the dates option on a DA/DT: JITTER by the patient's day shift (times kept);
  option ``C`` of the patient-characteristics option: the Basic Profile's action (removal is a valid cleaning).

Beyond the table, as the profile requires: private attributes go (``remove_private``), so do curves (50xx) and
overlays (60xx); every other person name is emptied and every other non-DICOM UID is replaced; any remaining text
that quotes the patient's name, ID, birth date or an original UID is removed.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, FileDataset
from pydicom.datadict import DicomDictionary, dictionary_VR

log = logging.getLogger(__name__)

__all__ = ["DEID_CODES", "DEID_METHOD", "ProfileRow", "apply_profile", "recipe_text", "table_e1_1"]

TABLE = Path(__file__).with_name("data") / "ps315_table_e1_1.tsv"
DICOM_UID_ROOT = "1.2.840.10008."
DEID_METHOD = "PS3.15 E.1 Basic Profile; options 113107 113108"  # LO: at most 64 chars
DEID_CODES = (("113100", "Basic Application Confidentiality Profile"),
              ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
              ("113108", "Retain Patient Characteristics Option"))
#: dummy values for the ``D`` action, by VR (PS3.15 E.3.1: "a non-zero length value that may be a dummy value")
DUMMY = {"PN": "ANONYMIZED", "LO": "ANONYMIZED", "SH": "ANONYMIZED", "LT": "ANONYMIZED", "ST": "ANONYMIZED",
         "UT": "ANONYMIZED", "UC": "ANONYMIZED", "CS": "ANONYMIZED", "AE": "ANONYMIZED", "UR": "ANONYMIZED",
         "DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "IS": "0", "DS": "0"}
#: set by the archive after the recipe ran (pseudonyms, age); the recipe empties them wherever they occur
_OWN = {"PatientID", "PatientName", "PatientBirthDate", "PatientAge"}


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1: tag (``GGGGEEEE``, ``x`` for repeating groups), keyword and the three actions."""

    tag: str
    keyword: str
    basic: str
    patient_chars: str
    modified_dates: str
    name: str

    @property
    def vr(self) -> str:
        """The element's VR from pydicom's dictionary ('' when unknown or a repeating group)."""
        try:
            return dictionary_VR(int(self.tag, 16)).split(" ")[0]
        except (KeyError, ValueError):
            return ""


@functools.cache
def table_e1_1() -> tuple[ProfileRow, ...]:
    """The rows of PS3.15 Table E.1-1 (see ``data/ps315_table_e1_1.tsv``)."""
    with TABLE.open(encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    return tuple(ProfileRow(*r) for r in rows)


def _action(row: ProfileRow) -> tuple[str, str | None]:
    """(deid action, value) for one row under our options; value None where the action takes none."""
    vr = row.vr
    if row.patient_chars == "K":
        return "KEEP", None
    if row.modified_dates == "C" and vr in ("DA", "DT"):
        return "JITTER", "func:date_shift"
    if row.modified_dates == "C" and vr == "TM":
        return "KEEP", None
    basic = row.basic
    if basic == "X":
        return "REMOVE", None
    if basic in ("Z", "X/Z", "Z/D", "X/Z/D"):
        return "BLANK", None
    if basic == "U":
        return "REPLACE", "func:uid"
    if basic == "X/Z/U*":  # no action of its own (a KEEP would shield the items): the UI and PN rules clean them
        return "", None
    if basic in ("D", "X/D"):
        return ("BLANK", None) if vr == "SQ" or vr not in DUMMY else ("REPLACE", DUMMY[vr])
    raise ValueError(f"Table E.1-1 row {row.tag} has an unknown action {basic!r}")


def _dictionary_uid_keywords() -> list[str]:
    """Keywords of every UI attribute in pydicom's data dictionary, except the transfer syntax and file-meta
    implementation UIDs."""
    skip = {"TransferSyntaxUID", "ImplementationClassUID"}
    return sorted(e[4] for e in DicomDictionary.values() if e[0] == "UI" and e[4] and e[4] not in skip)


@functools.cache
def recipe_text() -> str:
    """The ``deid`` recipe (FORMAT dicom, ``%header`` section) for the profile with our two options."""
    lines = ["FORMAT dicom", "", "%header", ""]
    for row in table_e1_1():
        if "X" in row.tag:  # repeating groups (curves 50xx, overlays 60xx): whole groups go
            base = int(row.tag[:2], 16) << 8
            lines += [f"REMOVE select:group:{base + g:04X}" for g in range(0, 0x20, 2)]
            continue
        field = row.keyword or f"({row.tag[:4]},{row.tag[4:]})"
        action, value = _action(row)
        if action:
            lines.append(f"{action} {field}" + (f" {value}" if value else ""))
    # every other UID of the dictionary (named one by one: deid never removes a field that a REPLACE names, so a
    # "select:VR:UI" rule would shield the UIDs the table removes)
    removed = {row.keyword for row in table_e1_1() if _action(row)[0] == "REMOVE"}
    lines += [f"REPLACE {kw} func:uid" for kw in _dictionary_uid_keywords() if kw not in removed]
    lines += ["BLANK select:VR:PN", "REMOVE all func:quotes_identifier"]
    return "\n".join(dict.fromkeys(lines)) + "\n"  # keep order, drop repeats (curves and overlays)


@functools.cache
def _recipe_file() -> str:
    """The recipe written once per process (``deid`` reads recipes from files), removed at exit."""
    import atexit
    import tempfile

    fd, path = tempfile.mkstemp(prefix="dicomnode-ps315-", suffix=".dicom")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(recipe_text())
    atexit.register(lambda: Path(path).unlink(missing_ok=True))
    return path


@functools.cache
def _deid() -> tuple[Any, Any]:
    """deid's recipe and parser classes; imported once, without the deprecation notice deid's own imports of
    ``pydicom.pixel_data_handlers`` log (pydicom 3 warns and logs it at WARNING)."""
    pd_log = logging.getLogger("pydicom")
    level = pd_log.level
    pd_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from deid.config import DeidRecipe
            from deid.dicom.parser import DicomParser
    finally:
        pd_log.setLevel(level)
    return DeidRecipe, DicomParser


def apply_profile(ds: Dataset, *, uid: Callable[[str], str], shift_days: int, quoted: list[str]) -> Dataset:
    """De-identify ``ds`` in place with the recipe; return it.

    ``uid`` maps an original UID to its pseudonym, ``shift_days`` (negative: back in time) moves every date and
    ``quoted`` are strings (name, ID, birth date, UIDs) whose appearance in any remaining text removes that text.
    """
    DeidRecipe, DicomParser = _deid()  # noqa: N806 - classes
    needles = [q.upper() for q in quoted if len(q) >= 3]

    produced: set[str] = set()  # a U row and the catch-all UI rule both reach a UID: map it once

    def one_uid(value: str) -> str:
        if not value or value.startswith(DICOM_UID_ROOT) or value in produced:
            return value
        new = uid(value)
        produced.add(new)
        return new

    def uid_value(field: Any, **_: Any) -> Any:
        value = field.element.value
        if isinstance(value, str) or value is None:
            return one_uid(str(value or ""))
        return [one_uid(str(v)) for v in value]

    def quotes_identifier(field: Any, **_: Any) -> bool:
        elem = field.element
        if elem.VR in ("SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN") or elem.keyword in _OWN or elem.VR == "UI":
            return False
        text = str(elem.value).upper()
        return any(n in text for n in needles)

    if not isinstance(ds, FileDataset):  # deid hashes FileDatasets by identity while it walks them
        meta = getattr(ds, "file_meta", None)
        ds = FileDataset("", ds, preamble=b"\0" * 128, file_meta=meta)
    parser = DicomParser(ds, recipe=DeidRecipe(_recipe_file()))
    parser.define("uid", uid_value)
    parser.define("date_shift", lambda **_: shift_days)
    parser.define("quotes_identifier", quotes_identifier)
    parser.parse(remove_private=True)
    return parser.dicom
