"""Label intake: manifests keyed by ORIGINAL UIDs -> rows keyed by the archive's pseudonymous UIDs.

Labels arrive as ``*.jsonl`` / ``*.csv`` files (the DESIGN.md manifest format, as a RIS
export or an annotation tool writes them) in ``incoming_labels/``. Each row is
mapped through the node's key mapping (``<key_dir>/uid_map.jsonl``, format in
:mod:`inference.archive_format`) to the pseudonymised study in the archive, validated,
and merged into the per-task label store ``<labels_dir>/<task>.jsonl`` (a later
label for the same key replaces the earlier one). The task is the row's
``task`` field, else the task the series was archived for.

A radiologist's verdict on an AI finding is one more kind of row::

    {"kind": "ai_feedback", "study_uid": "...", "decision": "accept" | "reject",
     "ai_label": <what the AI reported>, "corrected_label": <optional>}

``accept`` makes ``ai_label`` the label; ``reject`` uses ``corrected_label``, or
for a binary finding (true/false, 0/1) the opposite value.

Nothing is lost: a file that was read goes to ``incoming_labels/processed/``; its
rejected rows (malformed, unknown UID, invalid field) are copied verbatim with
the reason to ``incoming_labels/rejected/<file>.<stamp>.jsonl``; mask files a row
names (relative to the label file) are copied into ``<labels_dir>/masks/``; a file that
cannot be read at all stays where it is, and the report says why.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inference.archive_format import read_uid_map, sidecars
from inference.fsutil import atomic_write_text
from training.synth.manifest import ManifestError, _csv_cell, validate_row

log = logging.getLogger(__name__)

__all__ = ["ArchiveIndex", "IntakeReport", "LabelStore", "read_uid_map", "run_intake"]

_KEYS = ("study_uid", "study_instance_uid", "sop_instance_uid")


@dataclass
class ArchiveIndex:
    """What the archive holds, from its ``series.json`` sidecars (pseudonymous UIDs only)."""

    studies: dict[str, dict[str, Any]] = field(default_factory=dict)  # study -> {"task", "patient_id", "tasks"}
    sop_to_study: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, archive_dir: str | os.PathLike[str]) -> ArchiveIndex:
        """Scan ``<archive_dir>/studies/*/*/series.json``."""
        idx = cls()
        for _, obj in sidecars(archive_dir):
            study = str(obj.get("study_uid"))
            entry = idx.studies.setdefault(study, {"patient_id": obj.get("patient_id"), "tasks": set()})
            entry["tasks"].add(obj.get("task"))
            for name in obj.get("files", []):
                idx.sop_to_study[str(name).removesuffix(".dcm")] = study
        return idx


class LabelStore:
    """Per-task label rows keyed by pseudonymous UIDs, rewritten atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, task: str) -> Path:
        """The task's ``<task>.jsonl``."""
        return self.root / f"{task}.jsonl"

    def rows(self, task: str) -> list[dict[str, Any]]:
        """Every stored row of ``task``."""
        p = self.path(task)
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    def merge(self, task: str, new: list[dict[str, Any]]) -> int:
        """Add rows; a row with the same key replaces the stored one. Returns how many keys were new."""
        current = {_key(r): r for r in self.rows(task)}
        added = sum(1 for r in new if _key(r) not in current)
        current.update({_key(r): r for r in new})
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(task), "".join(json.dumps(r, sort_keys=True) + "\n" for r in current.values()))
        return added


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("sop_instance_uid") or ""), str(row.get("study_uid") or "")


@dataclass
class IntakeReport:
    """Outcome of one intake pass."""

    files_processed: list[str] = field(default_factory=list)
    files_kept: list[dict[str, str]] = field(default_factory=list)  # unreadable files left in place, with reason
    accepted: dict[str, int] = field(default_factory=dict)  # task -> rows accepted
    new_keys: dict[str, int] = field(default_factory=dict)  # task -> keys not labelled before
    feedback: dict[str, int] = field(default_factory=dict)  # "accept"/"reject" -> count
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"file", "row", "error"}

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for the run report."""
        return {"files_processed": self.files_processed, "files_kept": self.files_kept, "accepted": self.accepted,
                "new_keys": self.new_keys, "feedback": self.feedback, "errors": self.errors}


class _RowError(Exception):
    pass


def _rows_of(path: Path) -> list[tuple[int, str, dict[str, Any] | None, str | None]]:
    """(line, raw text, parsed row or None, parse error) for each non-empty row.

    Raises
    ------
    ManifestError
        If the file as a whole cannot be read (encoding, CSV without a key column).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read {path.name}: {exc}") from exc
    out: list[tuple[int, str, dict[str, Any] | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        lines = text.splitlines()
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or not set(_KEYS) & set(reader.fieldnames):
            raise ManifestError(f"{path.name}: header needs a study_uid or sop_instance_uid column")
        for raw in reader:
            n = reader.line_num
            src = lines[n - 1] if 0 < n <= len(lines) else ""
            if None in raw:
                out.append((n, src, None, "more cells than header columns"))
                continue
            try:
                out.append((n, src, {k: v for k, v in ((k, _csv_cell(k, v or "")) for k, v in raw.items())
                                     if v is not None}, None))
            except ValueError as exc:
                out.append((n, src, None, str(exc)))
        return out
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append((n, line, None, f"invalid JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict):
            out.append((n, line, None, "expected a JSON object"))
            continue
        out.append((n, line, obj, None))
    return out


def _feedback(row: dict[str, Any]) -> tuple[dict[str, Any], str]:
    decision = str(row.pop("decision", "")).lower()
    ai = row.pop("ai_label", None)
    corrected = row.pop("corrected_label", None)
    row.pop("kind", None)
    if decision not in ("accept", "reject"):
        raise _RowError("ai_feedback needs decision 'accept' or 'reject'")
    if ai is None:
        raise _RowError("ai_feedback needs 'ai_label' (what the AI reported)")
    if decision == "accept":
        label = ai
    elif corrected is not None:
        label = corrected
    elif isinstance(ai, bool) or ai in (0, 1):
        label = (not ai) if isinstance(ai, bool) else 1 - int(ai)
    else:
        raise _RowError("reject of a non-binary AI finding needs 'corrected_label'")
    row["label"] = label
    row["label_source"] = f"ai_feedback:{decision}"
    return row, decision


def _map_row(row: dict[str, Any], uid_map: dict[tuple[str, str], str], index: ArchiveIndex) -> tuple[dict[str, Any], str]:
    """Replace original UIDs by pseudonyms; return (row, task)."""
    row = dict(row)
    study_orig = row.pop("study_instance_uid", None) or row.get("study_uid")
    sop_orig = row.get("sop_instance_uid")
    if not study_orig and not sop_orig:
        raise _RowError("needs 'study_uid' or 'sop_instance_uid'")
    study = sop = None
    if sop_orig:
        sop = uid_map.get(("SOPInstanceUID", str(sop_orig)))
        if sop is None or sop not in index.sop_to_study:
            raise _RowError(f"unknown SOP instance UID {sop_orig} (not in the training archive)")
        study = index.sop_to_study[sop]
    if study_orig:
        mapped = uid_map.get(("StudyInstanceUID", str(study_orig)))
        if mapped is None or mapped not in index.studies:
            raise _RowError(f"unknown study UID {study_orig} (not in the training archive, or evicted)")
        if study is not None and mapped != study:
            raise _RowError("sop_instance_uid does not belong to study_uid")
        study = mapped
    assert study is not None
    row["study_uid"] = study
    if sop:
        row["sop_instance_uid"] = sop
    for box in row.get("boxes") or []:
        if isinstance(box, dict) and box.get("sop_instance_uid"):
            b = uid_map.get(("SOPInstanceUID", str(box["sop_instance_uid"])))
            if b is None:
                raise _RowError(f"box references unknown SOP instance UID {box['sop_instance_uid']}")
            box["sop_instance_uid"] = b
    entry = index.studies[study]
    row["patient_id"] = entry["patient_id"]  # never the original; the archive's pseudonym
    task = row.pop("task", None)
    tasks = sorted(t for t in entry["tasks"] if t)
    if task is None:
        if len(tasks) != 1:
            raise _RowError(f"study was archived for tasks {tasks}; the row must name its 'task'")
        task = tasks[0]
    return row, str(task)


def _copy_mask(incoming: Path, masks: Path, row: dict[str, Any]) -> str:
    """Copy a mask named relative to the label file into the label store; return its absolute path."""
    src = Path(str(row["mask"]))
    src = src if src.is_absolute() else incoming / src
    if not src.is_file():
        raise _RowError(f"mask file {row['mask']} not found next to the label file")
    name = src.name
    suffix = ".nii.gz" if name.lower().endswith(".nii.gz") else src.suffix
    key = str(row.get("sop_instance_uid") or row["study_uid"])
    masks.mkdir(parents=True, exist_ok=True)
    dest = masks / f"{key}{suffix}"
    shutil.copy2(src, dest)
    return str(dest.resolve())


def run_intake(incoming_dir: str | os.PathLike[str], archive_dir: str | os.PathLike[str],
               key_dir: str | os.PathLike[str], labels_dir: str | os.PathLike[str]) -> IntakeReport:
    """Process every label file in ``incoming_dir``; see the module docstring. Never raises for bad rows."""
    incoming = Path(incoming_dir)
    report = IntakeReport()
    files = sorted(p for p in incoming.glob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in (".jsonl", ".csv"))
    if not files:
        return report
    uid_map = read_uid_map(key_dir)
    index = ArchiveIndex.read(archive_dir)
    store = LabelStore(labels_dir)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for path in files:
        try:
            rows = _rows_of(path)
        except ManifestError as exc:
            report.files_kept.append({"file": path.name, "error": str(exc)})
            log.warning("label file %s kept in place: %s", path.name, exc)
            continue
        per_task: dict[str, list[dict[str, Any]]] = {}
        rejected: list[dict[str, Any]] = []
        for line, raw, row, err in rows:
            try:
                if err is not None:
                    raise _RowError(err)
                assert row is not None
                decision = None
                if row.get("kind") == "ai_feedback":
                    row, decision = _feedback(dict(row))
                elif row.get("kind") not in (None, "label"):
                    raise _RowError(f"unknown row kind {row.get('kind')!r}")
                row.pop("kind", None)
                mapped, task = _map_row(row, uid_map, index)
                if mapped.get("mask"):
                    mapped["mask"] = _copy_mask(incoming, Path(labels_dir) / "masks", mapped)
                try:
                    clean = validate_row(mapped, f"{path.name} line {line}")
                except ManifestError as exc:
                    raise _RowError(str(exc)) from None
                per_task.setdefault(task, []).append(clean)
                if decision:
                    report.feedback[decision] = report.feedback.get(decision, 0) + 1
            except _RowError as exc:
                report.errors.append({"file": path.name, "row": line, "error": str(exc)})
                rejected.append({"line": line, "error": str(exc), "raw": raw})
        for task, task_rows in per_task.items():
            report.new_keys[task] = report.new_keys.get(task, 0) + store.merge(task, task_rows)
            report.accepted[task] = report.accepted.get(task, 0) + len(task_rows)
        if rejected:
            rej_dir = incoming / "rejected"
            rej_dir.mkdir(exist_ok=True)
            (rej_dir / f"{path.name}.{stamp}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rejected), encoding="utf-8")
        done = incoming / "processed"
        done.mkdir(exist_ok=True)
        shutil.move(str(path), done / f"{stamp}-{path.name}")
        report.files_processed.append(path.name)
        log.info("labels %s: %d accepted, %d rejected", path.name, sum(map(len, per_task.values())), len(rejected))
    return report
