"""``dicomnode-train import-labels``: a labels manifest from what a hospital exports.

::

    dicomnode-train import-labels --dicom STUDIES/ --task wrist_fracture \\
        --table ris_export.csv --positive "fracture" --negative "no fracture" \\
        [--dxa dxa.xlsx] [--seg SEG_DIR_OR_FILE ...] [--sr SR_DIR_OR_FILE ...]

* ``--table``: CSV or Excel rows keyed by accession number or Study Instance UID
  (column found by name: ``AccessionNumber``/``Accession``, ``StudyInstanceUID``/``study_uid``),
  mapped to studies through the DICOM files under ``--dicom``; the label column
  (``--label-column``, default the first of label/finding/result/class/diagnosis)
  holds 0/1, yes/no, or the values named by ``--positive``/``--negative``
  (spine: the class names).
* ``--dxa``: per-level T-scores (wide ``L1``..``L4`` columns or long ``level`` + ``T-score``),
  classed by the WHO cut-offs into ``vertebrae``; the study label is the lowest level's class.
* ``--seg``/``--sr``: annotation objects (DICOM SEG, TID 1500 SR); their regions become ``boxes``.

The manifest (``labels.jsonl`` in ``--dicom``, or ``--out``) gets every row that
maps to a study; every other row, and every annotation file that cannot be used,
goes to ``rejects.csv`` beside it with the reason. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from inference.errors import DicomNodeError
from inference.fsutil import walk_files
from training.import_readers import (
    LabelImportError,
    dxa_levels,
    normalise,
    read_table,
    seg_boxes,
    sr_boxes,
    who_class,
)

log = logging.getLogger(__name__)

__all__ = ["ImportResult", "LabelImporter", "add_arguments", "run", "scan_dicom"]

ACCESSION_COLUMNS = ("accessionnumber", "accession", "accessionno", "accno", "accnr")
UID_COLUMNS = ("studyinstanceuid", "studyuid", "studyinstance")
LABEL_COLUMNS = ("label", "finding", "result", "class", "diagnosis", "outcome")
ANNOTATION_MODALITIES = ("SEG", "SR", "KO", "PR", "RTSTRUCT")
_CLASSES = ("normal", "osteopenia", "osteoporosis")
_SEVERITY = {c: i for i, c in enumerate(_CLASSES)}


@dataclass
class Study:
    """What the DICOM files say about one study."""

    study_uid: str
    accession: str
    sops: set[str] = field(default_factory=set)


def scan_dicom(root: Path) -> tuple[dict[str, Study], dict[str, set[str]], list[Path]]:
    """Studies under ``root`` (by UID), Study UIDs by accession number, and annotation objects found among them."""
    studies: dict[str, Study] = {}
    by_acc: dict[str, set[str]] = {}
    annotations: list[Path] = []
    for f in walk_files(root):
        if f.suffix.lower() in (".json", ".jsonl", ".csv", ".xlsx"):
            continue
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID", "SOPInstanceUID", "AccessionNumber", "Modality"])
        except Exception:  # noqa: BLE001 - anything that is not DICOM is skipped
            continue
        uid = str(ds.get("StudyInstanceUID") or "")
        if not uid:
            continue
        if str(ds.get("Modality") or "") in ANNOTATION_MODALITIES:
            annotations.append(f)
            continue
        st = studies.setdefault(uid, Study(uid, str(ds.get("AccessionNumber") or "").strip()))
        st.sops.add(str(ds.get("SOPInstanceUID") or ""))
        if st.accession:
            by_acc.setdefault(st.accession, set()).add(uid)
    return studies, by_acc, annotations


def _column(headers: Iterable[str], wanted: Iterable[str], given: str | None) -> str | None:
    if given is not None:
        for h in headers:
            if h == given or normalise(h) == normalise(given):
                return h
        raise LabelImportError(f"column {given!r} not found; the table has {', '.join(headers)}")
    norm = {normalise(h): h for h in headers}
    for w in wanted:
        if w in norm:
            return norm[w]
    return None


@dataclass
class ImportResult:
    """Where the manifest and the rejects went, and how many rows each got."""

    manifest: Path
    rejects: Path
    n_rows: int
    n_rejected: int


class LabelImporter:
    """Collects manifest rows per study from several exports; every input row is kept or rejected with a reason."""

    def __init__(self, dicom_dir: str | os.PathLike[str], task: str, *, positive: Iterable[str] = (),
                 negative: Iterable[str] = ()) -> None:
        self.root = Path(dicom_dir)
        if not self.root.is_dir():
            raise LabelImportError(f"DICOM folder {self.root} does not exist")
        self.task = task
        self.positive = {v.strip().lower() for v in positive} | {"1", "true", "yes", "positive", "y"}
        self.negative = {v.strip().lower() for v in negative} | {"0", "false", "no", "negative", "n"}
        self.studies, self.by_acc, found = scan_dicom(self.root)
        self.rows: dict[str, dict[str, Any]] = {}
        self.origin: dict[str, str] = {}
        self.rejects: list[dict[str, str]] = []
        for f in found:
            self.reject(str(f), "", "", "annotation object inside the image folder (training would read it as an "
                        "image): move it out and pass it with --seg/--sr")

    def reject(self, source: str, row: str, key: str, reason: str) -> None:
        """Record a row (or file) that does not go into the manifest."""
        self.rejects.append({"source": source, "row": row, "key": key, "reason": reason})

    def _study(self, rec: dict[str, str], acc_col: str | None, uid_col: str | None) -> tuple[str, str]:
        """(key as written, Study UID) of a table row; raises ValueError with the reason."""
        uid = rec.get(uid_col, "").strip() if uid_col else ""
        if uid:
            if uid not in self.studies:
                raise ValueError(f"no study with Study UID {uid} under {self.root}")
            return uid, uid
        acc = rec.get(acc_col, "").strip() if acc_col else ""
        if not acc:
            raise ValueError("no accession number or Study UID in the row")
        hits = self.by_acc.get(acc, set())
        if not hits:
            raise ValueError(f"no study with accession number {acc} under {self.root}")
        if len(hits) > 1:
            raise ValueError(f"accession number {acc} matches {len(hits)} studies; key this row by Study UID")
        return acc, next(iter(hits))

    def _label(self, text: str) -> Any:
        v = text.strip().lower()
        if self.task == "spine_bmd" and v in _CLASSES:
            return v
        if v in self.positive:
            return 1
        if v in self.negative:
            return 0
        raise ValueError(f"label {text!r} is neither a --positive nor a --negative value")

    def _keyed_rows(self, path: Path, key_col: str | None) -> Iterable[tuple[int, dict[str, str], str, str]]:
        """(row number, row, key, Study UID) of each table row that maps to a study; the others are rejected."""
        rows = read_table(path)
        headers = list(rows[0]) if rows else []
        if key_col:  # a named column holds Study UIDs when every value looks like one, else accession numbers
            col = _column(headers, (), key_col)
            values = [r.get(col or "", "") for r in rows if r.get(col or "")]
            is_uid = bool(values) and all(re.fullmatch(r"\d+(\.\d+){2,}", v) for v in values)
            acc_col, uid_col = (None, col) if is_uid else (col, None)
        else:
            acc_col, uid_col = _column(headers, ACCESSION_COLUMNS, None), _column(headers, UID_COLUMNS, None)
        if rows and acc_col is None and uid_col is None:
            raise LabelImportError(f"{path.name}: no accession number or Study UID column (have {', '.join(headers)});"
                                   " name it with --key-column")
        for i, rec in enumerate(rows, start=2):  # row 1 is the header
            try:
                key, uid = self._study(rec, acc_col, uid_col)
            except ValueError as exc:
                self.reject(path.name, str(i), rec.get(acc_col or "", "") or rec.get(uid_col or "", ""), str(exc))
                continue
            yield i, rec, key, uid

    def add_table(self, path: str | os.PathLike[str], *, label_column: str | None = None,
                  key_column: str | None = None) -> None:
        """Study labels from a RIS/PACS export table."""
        p = Path(path)
        rows = read_table(p)
        col = _column(list(rows[0]) if rows else [], LABEL_COLUMNS, label_column)
        if rows and col is None:
            raise LabelImportError(f"{p.name}: no label column (have {', '.join(rows[0])}); name it with "
                                   "--label-column")
        for i, rec, key, uid in self._keyed_rows(p, key_column):
            try:
                label = self._label(rec.get(col or "", ""))
            except ValueError as exc:
                self.reject(p.name, str(i), key, str(exc))
                continue
            row = self.rows.get(uid)
            if row is not None and "label" in row:
                why = "duplicate of" if row["label"] == label else f"conflicts with label {row['label']!r} from"
                self.reject(p.name, str(i), key, f"{why} {self.origin[uid]}")
                continue
            self.rows.setdefault(uid, {"study_uid": uid, "task": self.task})["label"] = label
            self.origin[uid] = f"{p.name} row {i}"

    def add_dxa(self, path: str | os.PathLike[str], *, key_column: str | None = None) -> None:
        """Per-level T-scores of spine studies -> ``vertebrae`` classes (WHO) and the lowest class as the label."""
        p = Path(path)
        rows = read_table(p)
        headers = list(rows[0]) if rows else []
        level_col = _column(headers, ("level", "vertebra", "region"), None)
        t_col = _column(headers, ("tscore", "t", "tvalue", "score"), None)
        for i, rec, key, uid in self._keyed_rows(p, key_column):
            try:
                levels = dxa_levels(rec, level_col if t_col else None, t_col if level_col else None)
            except ValueError as exc:
                self.reject(p.name, str(i), key, str(exc))
                continue
            row = self.rows.setdefault(uid, {"study_uid": uid, "task": self.task})
            t_scores = row.setdefault("t_scores", {})
            clash = [lv for lv in levels if lv in t_scores and t_scores[lv] != levels[lv]]
            if clash:
                self.reject(p.name, str(i), key, f"T-score of {', '.join(clash)} differs from an earlier row")
                continue
            t_scores.update(levels)
            row["vertebrae"] = {lv: who_class(t) for lv, t in sorted(t_scores.items())}
            row["label"] = max(row["vertebrae"].values(), key=lambda c: _SEVERITY[c])
            self.origin.setdefault(uid, f"{p.name} row {i}")

    def add_annotations(self, paths: Iterable[str | os.PathLike[str]], kind: str) -> None:
        """Boxes from DICOM SEG (``kind="seg"``) or TID 1500 SR (``kind="sr"``) files or folders of them."""
        reader = seg_boxes if kind == "seg" else sr_boxes
        for f in _files(paths):
            try:
                uid, boxes = reader(f)
            except LabelImportError as exc:
                self.reject(str(f), "", "", str(exc))
                continue
            study = self.studies.get(uid)
            if study is None:
                self.reject(str(f), "", uid, f"its study {uid} is not under {self.root}")
                continue
            foreign = sorted({b["sop_instance_uid"] for b in boxes} - study.sops)
            if foreign:
                self.reject(str(f), "", uid, f"references {len(foreign)} image(s) not in the study folder")
                continue
            if not boxes:
                self.reject(str(f), "", uid, "holds no non-empty region")
                continue
            row = self.rows.setdefault(uid, {"study_uid": uid, "task": self.task})
            row.setdefault("boxes", []).extend({k: v for k, v in b.items() if k != "source"} for b in boxes)
            row.setdefault("annotation_sources", []).append(f"{kind.upper()} {f.name}")

    def write(self, manifest: Path, *, force: bool = False) -> ImportResult:
        """Write the manifest and ``rejects.csv`` beside it (rows without a label are rejected here)."""
        from training.synth.manifest import ManifestError, ManifestWriter

        if manifest.exists() and not force:
            raise LabelImportError(f"{manifest} exists; pass --force to replace it")
        rejects = manifest.parent / "rejects.csv"
        n = 0
        with ManifestWriter(manifest.parent, manifest.name) as w:
            for uid, row in sorted(self.rows.items()):
                if "label" not in row and "vertebrae" not in row:
                    self.reject(", ".join(row.get("annotation_sources", [])), "", uid,
                                "annotations for a study that no table labels: add it to the label table")
                    continue
                try:
                    w.append(row)
                    n += 1
                except ManifestError as exc:
                    self.reject(self.origin.get(uid, ""), "", uid, str(exc))
        with open(rejects, "w", encoding="utf-8", newline="") as fh:
            out = csv.DictWriter(fh, fieldnames=["source", "row", "key", "reason"])
            out.writeheader()
            out.writerows(self.rejects)
        return ImportResult(manifest, rejects, n, len(self.rejects))


def _files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += list(walk_files(p)) if p.is_dir() else [p]
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train import-labels``."""
    p.add_argument("--dicom", required=True, help="folder of the exported studies (the data folder)")
    p.add_argument("--task", required=True, help="task the labels are for (e.g. wrist_fracture, spine_bmd)")
    p.add_argument("--table", action="append", default=[], help="CSV/Excel export with a label per study")
    p.add_argument("--dxa", action="append", default=[], help="CSV/Excel DXA table of T-scores per level")
    p.add_argument("--seg", action="append", default=[], help="DICOM SEG file or folder")
    p.add_argument("--sr", action="append", default=[], help="TID 1500 SR file or folder")
    p.add_argument("--key-column", help="column of the accession number or Study UID (default: found by name)")
    p.add_argument("--label-column", help="column of the label (default: label/finding/result/class/diagnosis)")
    p.add_argument("--positive", action="append", default=[], help="a label value meaning positive (repeatable)")
    p.add_argument("--negative", action="append", default=[], help="a label value meaning negative (repeatable)")
    p.add_argument("--out", help="manifest path (default DICOM/labels.jsonl); rejects.csv goes beside it")
    p.add_argument("--force", action="store_true", help="replace an existing manifest")


def run(args: argparse.Namespace) -> int:
    """Import and print the counts; exit 2 with a one-line reason when an input cannot be read at all."""
    if not (args.table or args.dxa):
        print("error: give at least one label source: --table (study labels) or --dxa (T-scores)")
        return 2
    try:
        imp = LabelImporter(args.dicom, args.task, positive=args.positive, negative=args.negative)
        for t in args.table:
            imp.add_table(t, label_column=args.label_column, key_column=args.key_column)
        for t in args.dxa:
            imp.add_dxa(t, key_column=args.key_column)
        imp.add_annotations(args.seg, "seg")
        imp.add_annotations(args.sr, "sr")
        res = imp.write(Path(args.out) if args.out else Path(args.dicom) / "labels.jsonl", force=args.force)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{res.n_rows} studies in {res.manifest}; {res.n_rejected} rows rejected with reasons in {res.rejects}")
    return 0
