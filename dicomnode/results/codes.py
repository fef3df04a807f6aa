"""Coded concepts used by the result writers, and conversion to highdicom codes.

The code table itself lives in :mod:`inference.codes` so that the task modules
(which must not import ``dicomnode``) and the writers share one definition.
This module adds what only the SR writer needs: the CID 100 procedure codes,
the SR's own section and item names, and the units it reports in.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.coding import Code as PydicomCode

from inference.codes import *  # noqa: F403  (re-export the shared code table)
from inference.codes import IMAGING_PROCEDURE
from inference.findings import CUBIC_MM, MILLILITER, PERCENT, PROBABILITY_UNIT, Code

# --- "Procedure reported" (TID 1500 row 4) must come from CID 100 "Quantitative Diagnostic Imaging Procedures".
# The modality-specific SNOMED CT procedures used before (77477000, 113091000, 168537006) are not in CID 100;
# the LOINC "unspecified body region" procedures are, and so is SCT 363679005 "Imaging procedure". Radiographs
# use the latter: LOINC 43468-8 "XR unspecified body region" joined CID 100 after the PixelMed release Debian ships
# (20220618), whose validator would reject it.
CT_PROCEDURE = Code("25045-6", "LN", "CT unspecified body region")
MR_PROCEDURE = Code("25056-3", "LN", "MRI unspecified body region")
XR_PROCEDURE = IMAGING_PROCEDURE

_PROCEDURE_BY_MODALITY = {
    "CT": CT_PROCEDURE,
    "MR": MR_PROCEDURE,
    "DX": XR_PROCEDURE,
    "CR": XR_PROCEDURE,
    "RG": XR_PROCEDURE,
}

# --- TID 1500 row 12: the document-level "Qualitative Evaluations" container, and the SR's summary text.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
SUMMARY = Code("121111", "DCM", "Summary")

# --- units the SR reports in: (unit in Findings) -> (unit in the SR, factor)
_REPORTED_UNITS: dict[tuple[str, str], tuple[Code, float]] = {
    (PROBABILITY_UNIT.value, PROBABILITY_UNIT.scheme): (PERCENT, 100.0),
    (CUBIC_MM.value, CUBIC_MM.scheme): (MILLILITER, 0.001),
}


def procedure_for(modality: str | None) -> Code:
    """Procedure reported (CID 100) for a source modality; "Imaging procedure" when unknown."""
    return _PROCEDURE_BY_MODALITY.get(str(modality or "").strip().upper(), IMAGING_PROCEDURE)


def reported_unit(value: float, unit: Code) -> tuple[float, Code]:
    """``value`` in ``unit`` restated in the unit the SR uses (probability -> %, mm3 -> mL); others unchanged."""
    target = _REPORTED_UNITS.get((unit.value, unit.scheme))
    if target is None:
        return float(value), unit
    code, factor = target
    return float(value) * factor, code


def to_hd(code: Code | PydicomCode | hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    """Convert a findings :class:`Code` (or a pydicom code) to a highdicom ``CodedConcept``."""
    if isinstance(code, hd.sr.CodedConcept):
        return code
    if isinstance(code, PydicomCode):
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)

# --- the operating point a study-level conclusion was decided at (probability >= it is positive), stated in the
# conclusion's TID 1410 group so that OHIF prints it next to the probability. No standard concept exists.
OPERATING_POINT = Code("OPERATING-POINT", LOCAL, "Operating point")  # noqa: F405 (LOCAL from inference.codes)
