"""The labels manifest: one format for synthetic studies and a hospital's own export.

A data folder holds DICOM files plus ``labels.jsonl`` (one JSON object per
line) or ``labels.csv`` (one row per line, JSON in cells for lists/objects).
Each row is keyed by ``study_uid`` and/or ``sop_instance_uid`` (a row with a
SOP instance UID labels that one image; otherwise it labels the whole study).

Known fields (others pass through unchanged):

``study_uid``, ``sop_instance_uid``  str, at least one of them
``patient_id``  str, overrides the files' PatientID for patient-level splits
``label``  class name, grade or number (str/int/float/bool)
``boxes``  list of ``{"sop_instance_uid", "x0", "y0", "x1", "y1", "label"}`` in pixel
           coordinates of that instance (x = column, y = row, x0 < x1, y0 < y1)
``mask``  path of an .mha/.nii/.nii.gz mask or a DICOM SEG, relative to the folder
``vertebrae``  ``{"L1": "osteopenia", ...}``
``split_hint``  ``"train"``, ``"val"``, ``"holdout"`` or null

:class:`ManifestWriter` validates and appends rows to a temporary file and
renames it into place on :meth:`ManifestWriter.finalize`; :func:`read_manifest`
reads either format and raises :class:`ManifestError` naming the row and field.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from inference.errors import DicomNodeError

log = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAMES", "ManifestError", "ManifestWriter", "find_manifest", "read_manifest", "validate_row"]

#: file names looked for in a data folder, in order of preference
MANIFEST_NAMES: tuple[str, ...] = ("labels.jsonl", "labels.csv")
KEY_FIELDS = ("study_uid", "sop_instance_uid")
_STRING_FIELDS = ("study_uid", "sop_instance_uid", "patient_id", "mask")
_SPLITS = (None, "train", "val", "holdout")
_MASK_SUFFIXES = (".mha", ".mhd", ".nii", ".nii.gz", ".dcm", ".nrrd")


class ManifestError(DicomNodeError):
    """A labels manifest is missing, unreadable or has an invalid row."""


def _fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"{where}: {msg}")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def validate_row(row: Mapping[str, Any], where: str = "row") -> dict[str, Any]:
    """Check one manifest row and return it as a plain dict (boxes normalised to floats).

    Raises
    ------
    ManifestError
        Naming ``where`` (e.g. ``"labels.jsonl line 7"``) and the offending field.
    """
    if not isinstance(row, Mapping):
        raise _fail(where, f"expected a JSON object, got {type(row).__name__}")
    out = {str(k): v for k, v in row.items()}
    for k in _STRING_FIELDS:
        if k in out and out[k] is not None and not isinstance(out[k], str):
            raise _fail(where, f"field {k!r} must be a string, got {type(out[k]).__name__}")
        if k in out and out[k] == "":
            out[k] = None
    if not any(out.get(k) for k in KEY_FIELDS):
        raise _fail(where, "needs 'study_uid' or 'sop_instance_uid'")
    for k in KEY_FIELDS:
        uid = out.get(k)
        if uid and (len(uid) > 64 or not all(c.isdigit() or c == "." for c in uid)):
            raise _fail(where, f"field {k!r} is not a valid UID: {uid!r}")
    if "label" in out and out["label"] is not None and not isinstance(out["label"], str | int | float | bool):
        raise _fail(where, f"field 'label' must be a string, number or boolean, got {type(out['label']).__name__}")
    if out.get("split_hint") not in _SPLITS:
        raise _fail(where, f"field 'split_hint' must be one of train/val/holdout/null, got {out['split_hint']!r}")
    mask = out.get("mask")
    if mask is not None and not str(mask).lower().endswith(_MASK_SUFFIXES):
        raise _fail(where, f"field 'mask' must name an .mha/.nii/.nii.gz/.nrrd file or a DICOM SEG, got {mask!r}")
    if "vertebrae" in out and out["vertebrae"] is not None:
        v = out["vertebrae"]
        if not isinstance(v, Mapping) or not all(isinstance(a, str) and isinstance(b, str | int | float)
                                                 for a, b in v.items()):
            raise _fail(where, "field 'vertebrae' must map level names to classes, e.g. {\"L1\": \"normal\"}")
    if "boxes" in out and out["boxes"] is not None:
        out["boxes"] = _validate_boxes(out["boxes"], out.get("sop_instance_uid"), where)
    return out


def _validate_boxes(boxes: Any, row_sop: str | None, where: str) -> list[dict[str, Any]]:
    if not isinstance(boxes, list):
        raise _fail(where, "field 'boxes' must be a list")
    result = []
    for j, b in enumerate(boxes):
        w = f"{where} box {j}"
        if not isinstance(b, Mapping):
            raise _fail(w, "must be an object with x0, y0, x1, y1")
        box = dict(b)
        for c in ("x0", "y0", "x1", "y1"):
            if not _is_number(box.get(c)):
                raise _fail(w, f"coordinate {c!r} missing or not a number")
            box[c] = float(box[c])
        if not (box["x0"] < box["x1"] and box["y0"] < box["y1"]):
            raise _fail(w, f"needs x0 < x1 and y0 < y1, got {[box[c] for c in ('x0', 'y0', 'x1', 'y1')]}")
        if min(box["x0"], box["y0"]) < 0:
            raise _fail(w, "coordinates must be >= 0 (pixel coordinates)")
        sop = box.get("sop_instance_uid") or row_sop
        if not sop or not isinstance(sop, str):
            raise _fail(w, "needs 'sop_instance_uid' (or the row's) to say which image it is on")
        box["sop_instance_uid"] = sop
        if "label" in box and not isinstance(box["label"], str):
            raise _fail(w, "'label' must be a string")
        result.append(box)
    return result


def _row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return (str(row.get("sop_instance_uid") or ""), str(row.get("study_uid") or ""))


class ManifestWriter:
    """Append validated rows to ``<root>/<name>`` and publish the file atomically.

    Rows go to a hidden temporary file next to the target; :meth:`finalize`
    fsyncs it and renames it into place, so readers never see half a manifest.
    Use as a context manager: leaving with an exception calls :meth:`abort`.
    """

    def __init__(self, root: Path, name: str = "labels.jsonl") -> None:
        if not name.endswith(".jsonl"):
            raise ManifestError(f"ManifestWriter writes .jsonl manifests, got {name!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / name
        self._tmp = self.root / f".{name}.{os.getpid()}.tmp"
        self._fh = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in finalize/abort
        self._keys: set[tuple[str, str]] = set()
        self.count = 0

    def append(self, row: Mapping[str, Any]) -> None:
        """Validate and append one row; duplicate keys are rejected."""
        clean = validate_row(row, f"{self.path.name} row {self.count + 1}")
        key = _row_key(clean)
        if key in self._keys:
            raise ManifestError(f"{self.path.name} row {self.count + 1}: duplicate key {key}")
        self._keys.add(key)
        self._fh.write(json.dumps(clean, sort_keys=True, separators=(",", ":")) + "\n")
        self.count += 1

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append several rows."""
        for r in rows:
            self.append(r)

    def finalize(self) -> Path:
        """Flush, fsync and rename the manifest into place; return its path."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file; the previous manifest (if any) stays untouched."""
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._fh.closed:
            self.finalize()


def find_manifest(root: Path) -> Path:
    """Return the manifest file of a data folder (``root`` itself if it is a file)."""
    root = Path(root)
    if root.is_file():
        return root
    for name in MANIFEST_NAMES:
        if (root / name).is_file():
            return root / name
    raise ManifestError(f"no {' or '.join(MANIFEST_NAMES)} in {root}")


def _csv_cell(field: str, text: str) -> Any:
    text = text.strip()
    if text == "":
        return None
    if field in _STRING_FIELDS:
        return text
    if text[0] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"field {field!r} holds invalid JSON: {exc}") from None
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def read_manifest(root: Path) -> list[dict[str, Any]]:
    """Read and validate ``labels.jsonl`` or ``labels.csv`` (in folder ``root``, or the file ``root``).

    Raises
    ------
    ManifestError
        If no manifest exists, a line is not valid JSON/CSV, a row is invalid,
        or two rows share a key.
    """
    path = find_manifest(Path(root))
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if not reader.fieldnames or not set(KEY_FIELDS) & set(reader.fieldnames):
                    raise ManifestError(f"{path.name}: header needs a 'study_uid' or 'sop_instance_uid' column")
                for i, raw in enumerate(reader, start=2):
                    where = f"{path.name} line {i}"
                    if None in raw:
                        raise _fail(where, "more cells than header columns")
                    try:
                        row = {k: _csv_cell(k, v or "") for k, v in raw.items()}
                    except ValueError as exc:
                        raise _fail(where, str(exc)) from None
                    rows.append(validate_row({k: v for k, v in row.items() if v is not None}, where))
        else:
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise _fail(f"{path.name} line {i}", f"invalid JSON ({exc.msg})") from None
                    rows.append(validate_row(obj, f"{path.name} line {i}"))
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    seen: dict[tuple[str, str], int] = {}
    for i, r in enumerate(rows):
        k = _row_key(r)
        if k in seen:
            raise ManifestError(f"{path.name}: rows {seen[k] + 1} and {i + 1} have the same key {k}")
        seen[k] = i
    log.debug("read %d manifest rows from %s", len(rows), path)
    return rows
