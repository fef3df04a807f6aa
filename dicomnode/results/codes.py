"""Coded concepts used by the result writers, and conversion to highdicom codes.

The code table itself lives in :mod:`inference.codes` so that the task modules
(which must not import ``dicomnode``) and the writers share one definition.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.coding import Code as PydicomCode

from inference.codes import *  # noqa: F403  (re-export the shared code table)
from inference.codes import (
    COMPUTED_TOMOGRAPHY,
    IMAGING_PROCEDURE,
    MAGNETIC_RESONANCE_IMAGING,
    PLAIN_RADIOGRAPHY,
)
from inference.findings import Code

_PROCEDURE_BY_MODALITY = {
    "CT": COMPUTED_TOMOGRAPHY,
    "MR": MAGNETIC_RESONANCE_IMAGING,
    "DX": PLAIN_RADIOGRAPHY,
    "CR": PLAIN_RADIOGRAPHY,
    "RG": PLAIN_RADIOGRAPHY,
}


def procedure_for(modality: str | None) -> Code:
    """Procedure reported for a source modality; "Imaging procedure" when unknown."""
    return _PROCEDURE_BY_MODALITY.get(str(modality or "").strip().upper(), IMAGING_PROCEDURE)


def to_hd(code: Code | PydicomCode | hd.sr.CodedConcept) -> hd.sr.CodedConcept:
    """Convert a findings :class:`Code` (or a pydicom code) to a highdicom ``CodedConcept``."""
    if isinstance(code, hd.sr.CodedConcept):
        return code
    if isinstance(code, PydicomCode):
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
