"""Result writers: Findings -> DICOM objects (TID 1500 SR, SEG, secondary captures).

Writers know nothing about models. :func:`build_results` is the one entry point
the node and ``dicomnode analyze`` use; it lives in :mod:`dicomnode.results.builder`.

Contract
--------
``build_results(findings, sources, context) -> list[pydicom.Dataset]``

* ``findings``: :class:`inference.findings.Findings` of one task run on one study.
* ``sources``: every source dataset the task read (pixel data loaded), so the
  writers can copy patient/study attributes and geometry.
* ``context``: :class:`ResultContext`, below. The node persists the series UIDs
  per (study, route) so a re-run writes into the same result series with new
  instance UIDs, and the new SR lists the previous one as predecessor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PriorDocument:
    """Identifies an earlier SR that the new one supersedes (Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass
class ResultContext:
    """Identity and naming for the result objects of one (study, route) run."""

    series_uids: dict[str, str] = field(default_factory=dict)  # "sr" / "seg" / "sc" -> stable series UID
    series_numbers: dict[str, int] = field(default_factory=dict)  # kind -> SeriesNumber
    predecessors: list[PriorDocument] = field(default_factory=list)
    manufacturer: str = "bone-dicomnode project"
    model_name: str = "dicomnode"
    software_version: str = "0.1.0"
    institution_name: str | None = None
    device_observer_uid: str | None = None
