"""Readers of what hospitals export, for :mod:`training.import_labels`.

* tables: CSV (``,`` or ``;``, UTF-8 with or without BOM) or Excel ``.xlsx`` (first sheet; openpyxl);
* DXA T-score tables, wide (one column per level: ``L1``, ``L1 T-score`` ...) or long
  (``level`` + ``T-score`` columns), classed by the WHO cut-offs;
* DICOM SEG from annotation tools (highdicom ``segread``): one box per segment and source image;
* TID 1500 Comprehensive/Enhanced SR (highdicom ``srread``): planar ROI measurement groups with image
  regions (polyline, polygon, circle, ellipse, point) become boxes on their referenced image.

Every reader returns plain rows or raises :class:`LabelImportError` with a one-line reason.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import DicomNodeError

log = logging.getLogger(__name__)

__all__ = ["LabelImportError", "dxa_levels", "normalise", "read_table", "seg_boxes", "sr_boxes", "who_class"]

LEVELS = ("L1", "L2", "L3", "L4")


class LabelImportError(DicomNodeError):
    """An export cannot be read (the file as a whole; single rows go to the rejects file)."""


def normalise(name: str) -> str:
    """Column name for matching: lower case, only letters and digits (``"Accession No."`` -> ``"accessionno"``)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def read_table(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a CSV or ``.xlsx`` table as ``{header: cell text}`` (empty cells are ``""``).

    Raises
    ------
    LabelImportError
        If the file cannot be read or has no header row.
    """
    p = Path(path)
    try:
        if p.suffix.lower() in (".xlsx", ".xlsm"):
            return _read_xlsx(p)
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as exc:
        raise LabelImportError(f"cannot read table {p}: {exc}") from exc
    first = text.splitlines()[0] if text.strip() else ""
    if not first:
        raise LabelImportError(f"table {p} is empty: it needs a header row")
    delim = ";" if first.count(";") > first.count(",") else ("\t" if "\t" in first and "," not in first else ",")
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    return [{str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _read_xlsx(p: Path) -> list[dict[str, str]]:
    from openpyxl import load_workbook

    wb = load_workbook(p, read_only=True, data_only=True)
    try:
        rows = list(wb.worksheets[0].iter_rows(values_only=True))
    finally:
        wb.close()
    if not rows or not any(rows[0]):
        raise LabelImportError(f"table {p} has no header row in its first sheet")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    return [{h: ("" if v is None else _cell_text(v)) for h, v in zip(header, r, strict=False) if h}
            for r in rows[1:] if any(v not in (None, "") for v in r)]


def _cell_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()


def parse_number(text: str) -> float | None:
    """A number from a cell: decimal comma and the Unicode minus sign accepted; None if not a number."""
    t = str(text).strip().replace("\u2212", "-").replace(",", ".")
    try:
        v = float(t)
    except ValueError:
        return None
    return v if np.isfinite(v) else None


def who_class(t_score: float) -> str:
    """WHO class of a T-score: above -1 normal; -1 to above -2.5 osteopenia; -2.5 or below osteoporosis."""
    if t_score > -1.0:
        return "normal"
    if t_score > -2.5:
        return "osteopenia"
    return "osteoporosis"


def _level_of(column: str) -> str | None:
    m = re.fullmatch(r"(l[1-4])(t|tscore|tscores|tvalue)?", normalise(column))
    return m.group(1).upper() if m else None


def dxa_levels(row: dict[str, str], level_col: str | None, t_col: str | None) -> dict[str, float]:
    """T-scores per level of one DXA table row.

    Wide rows have one column per level; long rows (``level_col`` and ``t_col`` given) one level each.

    Raises
    ------
    ValueError
        With the reason, when a level's T-score is not a number or the level is unknown.
    """
    out: dict[str, float] = {}
    if level_col is not None and t_col is not None:
        level = _level_of(row.get(level_col, ""))
        if level is None:
            raise ValueError(f"level {row.get(level_col)!r} is not one of L1-L4")
        t = parse_number(row.get(t_col, ""))
        if t is None:
            raise ValueError(f"T-score {row.get(t_col)!r} of {level} is not a number")
        return {level: t}
    for col, text in row.items():
        level = _level_of(col)
        if level is None or text == "":
            continue
        t = parse_number(text)
        if t is None:
            raise ValueError(f"T-score {text!r} of {level} is not a number")
        out[level] = t
    if not out:
        raise ValueError("no T-score of L1-L4 in the row")
    return out


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def seg_boxes(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """(study UID, boxes) of a DICOM SEG: the bounding box of each segment on each referenced source image.

    Read with highdicom's ``segread``; a SEG that highdicom's reader refuses although pydicom reads it (e.g. a
    2-D SEG whose Pixel Measures lack a slice thickness, as highdicom itself writes for a radiograph) is read
    frame by frame from its functional groups instead.

    Raises
    ------
    LabelImportError
        If the file is not a readable SEG or references no source image.
    """
    import highdicom as hd
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        if str(ds.get("Modality")) != "SEG":
            raise ValueError(f"modality {ds.get('Modality')!r}, not SEG")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a bad file
        raise LabelImportError(f"{path} is not a readable DICOM SEG: {exc}") from exc
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.SegmentSequence}
    try:
        seg = hd.seg.Segmentation.from_dataset(ds)
    except (AttributeError, ValueError, KeyError, TypeError) as exc:
        log.info("highdicom cannot index %s (%s): reading its frames directly", path, exc)
        return str(ds.StudyInstanceUID), _seg_boxes_by_frame(ds, names)
    sources = [sop for _, _, sop in seg.get_source_image_uids()]
    if not sources:
        raise LabelImportError(f"SEG {path} references no source image")
    numbers = sorted(names)
    boxes = []
    for sop in sources:
        try:
            arr = seg.get_pixels_by_source_instance([sop], segment_numbers=numbers)
        except (ValueError, KeyError, RuntimeError):
            continue  # a source image without a frame of this segmentation
        for k, number in enumerate(numbers):
            boxes += _box_rows(arr[0, :, :, k] > 0, sop, names[number])
    return str(seg.StudyInstanceUID), boxes


def _box_rows(mask: np.ndarray, sop: str, label: str) -> list[dict[str, Any]]:
    box = _bbox(mask)
    return [] if box is None else [{"sop_instance_uid": sop, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                                    "label": label, "source": "SEG"}]


def _seg_boxes_by_frame(ds: Any, names: dict[int, str]) -> list[dict[str, Any]]:
    """Boxes of a SEG from each frame's source image and segment number (Per-Frame Functional Groups)."""
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    boxes = []
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=False):
        ident = group.get("SegmentIdentificationSequence") or (shared.get("SegmentIdentificationSequence")
                                                                 if shared is not None else None)
        number = int(ident[0].ReferencedSegmentNumber) if ident else 1
        for der in group.get("DerivationImageSequence", []):
            for src in der.get("SourceImageSequence", []):
                boxes += _box_rows(frame > 0, str(src.ReferencedSOPInstanceUID), names.get(number, str(number)))
    if not boxes and not any(g.get("DerivationImageSequence") for g in ds.PerFrameFunctionalGroupsSequence):
        raise LabelImportError("SEG references no source image")
    return boxes


def _region_box(region: Any) -> tuple[str, tuple[float, float, float, float]] | None:
    """(referenced SOP instance, box) of an SR image region (2-D SCOORD)."""
    pts = np.asarray(region.value, dtype=float).reshape(-1, 2)
    gtype = str(region.graphic_type.value if hasattr(region.graphic_type, "value") else region.graphic_type)
    if gtype == "CIRCLE" and len(pts) == 2:
        r = float(np.hypot(*(pts[1] - pts[0])))
        pts = np.array([pts[0] - r, pts[0] + r])
    sop = ""
    for item in getattr(region, "ContentSequence", []):
        for ref in getattr(item, "ReferencedSOPSequence", []):
            sop = str(ref.ReferencedSOPInstanceUID)
    if not sop or not len(pts):
        return None
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return sop, (float(x0), float(y0), float(max(x1, x0 + 1)), float(max(y1, y0 + 1)))


def sr_boxes(path: str | os.PathLike[str]) -> tuple[str, list[dict[str, Any]]]:
    """(study UID, boxes) of a TID 1500 measurement report: one box per planar ROI with an image region.

    The box label is the group's finding type (its code meaning), else its tracking identifier.

    Raises
    ------
    LabelImportError
        If the file is not a readable TID 1500 SR.
    """
    import highdicom as hd

    try:
        sr = hd.sr.srread(path)
        report = hd.sr.MeasurementReport.from_sequence([sr])
    except Exception as exc:  # noqa: BLE001 - pydicom/highdicom raise many types for a bad file
        raise LabelImportError(f"{path} is not a readable TID 1500 SR: {exc}") from exc
    boxes = []
    for group in report.get_planar_roi_measurement_groups():
        region = group.roi
        if region is None or not hasattr(region, "graphic_type"):
            continue
        got = _region_box(region)
        if got is None:
            continue
        finding = group.finding_type
        label = str(finding.meaning) if finding is not None else str(group.tracking_identifier or "region")
        sop, (x0, y0, x1, y1) = got
        boxes.append({"sop_instance_uid": sop, "x0": max(0.0, x0), "y0": max(0.0, y0), "x1": x1, "y1": y1,
                      "label": label, "source": "SR"})
    return str(sr.StudyInstanceUID), boxes
