"""The demo's report: study names, the key finding read back from each SR, the synthetic truth, and the
table and ``index.html`` / ``viewer.txt`` written into ``demo-out/``.

Pure functions over pydicom datasets and the synthetic labels manifests; :mod:`demo` runs the peers.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

#: concept names of a free-text statement of the whole result, preferred over the measurement groups
SUMMARY_NAMES = re.compile(r"summary|impression|conclusion|finding statement", re.IGNORECASE)
UNITS = {"[hnsf'U]": "HU", "{probability}": "", "%": "%", "mL": "mL", "mm": "mm", "1": ""}


@dataclass
class StudyRow:
    """One line of the demo's table."""

    uid: str
    task: str
    accession: str
    patient: str
    latency: str = "timeout"
    finding: str = "(no result yet)"
    truth: str = "-"
    explorer_url: str = ""
    viewer_url: str = ""
    overlays: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """What a radiologist calls the study: its accession number (the patient alias beneath it)."""
        return self.accession or self.uid[-12:]


# ---------------------------------------------------------------------------------------- study identity


def patient_alias(ds: pydicom.Dataset) -> str:
    """``"Moreau, Hugo (M, 24 y)"`` from the (synthetic) patient module."""
    name = str(ds.get("PatientName") or "").split("^")
    alias = ", ".join(p.strip().title() for p in name[:2] if p.strip()) or "anonymous"
    sex = str(ds.get("PatientSex") or "").strip()
    age = str(ds.get("PatientAge") or "").strip()
    if re.fullmatch(r"\d{3}[DWMY]", age):
        age = f"{int(age[:3])} {age[3].lower()}"
    extra = ", ".join(x for x in (sex, age) if x)
    return f"{alias} ({extra})" if extra else alias


def study_identity(folder: Path) -> tuple[str, str, str]:
    """``(StudyInstanceUID, AccessionNumber, patient alias)`` of the study whose files lie under ``folder``."""
    first = next(iter(sorted(folder.rglob("*.dcm"))))
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.get("AccessionNumber") or ""), patient_alias(ds)


# ---------------------------------------------------------------------------------------- SR findings


def _meaning(item: pydicom.Dataset, key: str = "ConceptNameCodeSequence") -> str:
    seq = item.get(key)
    return str(seq[0].CodeMeaning) if seq else ""


def _has_region(children: Any) -> bool:
    """True when a group refers to images (IMAGE / SCOORD items): an image-level finding."""
    for child in children or []:
        if child.get("ValueType") in ("IMAGE", "SCOORD", "SCOORD3D") or _has_region(child.get("ContentSequence")):
            return True
    return False


def _num(child: pydicom.Dataset) -> tuple[float, str]:
    mv = child.MeasuredValueSequence[0]
    unit = str(mv.MeasurementUnitsCodeSequence[0].CodeValue) if mv.get("MeasurementUnitsCodeSequence") else ""
    return float(mv.NumericValue), unit


def _group(children: Any) -> tuple[tuple[str, ...], str, bool] | None:
    """``(dedup key, text, carries a measurement)`` of one measurement group.

    E.g. ``"Wrist (right) fracture: Absent, p=0.05"`` or ``"L1 vertebra: Osteoporosis, p=0.82 66 HU"``.
    """
    codes: dict[str, str] = {}
    nums: list[tuple[str, float, str]] = []
    laterality = ""
    for child in children or []:
        vt, name = child.get("ValueType"), _meaning(child)
        if vt == "CODE" and child.get("ConceptCodeSequence"):
            codes.setdefault(name, _meaning(child, "ConceptCodeSequence"))
            if name == "Finding Site":
                for mod in child.get("ContentSequence") or []:
                    if _meaning(mod) == "Laterality" and mod.get("ConceptCodeSequence"):
                        laterality = _meaning(mod, "ConceptCodeSequence").lower()
        elif vt == "NUM" and child.get("MeasuredValueSequence"):
            value, unit = _num(child)
            nums.append((name, value, unit))
    finding, site = codes.pop("Finding", ""), codes.pop("Finding Site", "")
    if not finding:
        return None
    site = f"{site} ({laterality})" if site and laterality else site
    prob = next((v if u != "%" else v / 100.0 for n, v, u in nums if u in ("{probability}", "%")), None)
    extra = [f"{v / 1000.0:.0f} mL" if u == "mm3" else f"{v:.{0 if abs(v) >= 10 else 1}f} {UNITS[u]}".strip()
             for n, v, u in nums if u in UNITS and UNITS[u] and u != "%" or u == "mm3"]
    p = f"p={prob:.2f}" if prob is not None else ""
    qual = next(((k, v) for k, v in codes.items() if k.lower() in finding.lower() or finding.lower() in k.lower()),
                None)
    if qual is not None:  # a qualitative evaluation named after the finding: "Fracture = Absent"
        head = f"{site} {qual[0].lower()}: {qual[1]}".strip() if site else f"{qual[0]}: {qual[1]}"
        key = (site, qual[0], qual[1])
    elif extra and any(n.lower() == "volume" for n, _, _ in nums):
        head, key = f"{finding} {extra.pop(0)}", (site, finding, "volume")
    else:
        head = f"{site}: {finding}" if site else finding
        key = (site, finding)
    return key, ", ".join(x for x in [head, p, *extra] if x), bool(extra)


def finding_text(sr: pydicom.Dataset) -> str:
    """The SR's key finding in full: its summary statement, else its study-level groups and measurements."""
    statements: list[str] = []
    study: list[tuple[tuple[str, ...], str, bool]] = []
    image: list[tuple[tuple[str, ...], str, bool]] = []

    def walk(items: Any, under_group: bool) -> None:
        for item in items or []:
            name = _meaning(item)
            if item.get("ValueType") == "TEXT" and SUMMARY_NAMES.search(name) and item.get("TextValue"):
                statements.append(str(item.TextValue))
            if item.get("ValueType") == "CONTAINER" and name == "Measurement Group":
                got = _group(item.get("ContentSequence"))
                if got is not None:
                    (image if _has_region(item.get("ContentSequence")) else study).append(got)
                walk(item.get("ContentSequence"), True)
            elif "ContentSequence" in item:
                walk(item.ContentSequence, under_group)

    walk(sr.get("ContentSequence"), False)
    if statements:
        return "; ".join(dict.fromkeys(statements))
    # study-level conclusions first; image-level groups only where they carry a measurement (HU, mL), or where
    # the SR has no study-level group at all
    seen: dict[tuple[str, ...], str] = {}
    for key, text, measured in study + image:
        if measured or not study or (key, text, measured) in study:
            seen.setdefault(key, text)
    return "; ".join(seen.values()) or "(see SR)"


# ---------------------------------------------------------------------------------------- synthetic truth


def _read_manifest(folder: Path) -> list[dict[str, Any]]:
    path = folder / "labels.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _mask_ml(folder: Path, row: dict[str, Any]) -> dict[str, float]:
    """Bone volumes (mL) of a knee row: voxel counts times the voxel volume of its mask."""
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(folder / row["mask"]))
        reader.ReadImageInformation()
        sx, sy, sz = reader.GetSpacing()
    except (ImportError, KeyError, RuntimeError):
        return {}
    return {bone: n * sx * sy * sz / 1000.0 for bone, n in row.get("voxels", {}).items()}


def _truth_of(task: str, rows: list[dict[str, Any]], folder: Path) -> str:
    row = rows[0]
    if task == "wrist_fracture":
        return "fracture" if row.get("label_true") else "no fracture"
    if task == "physis_fracture":
        pos = [r for r in rows if r.get("label_true")]
        if not pos:
            return "no visible fracture" + (" (occult)" if any(r.get("study_fracture") for r in rows) else "")
        return f"{pos[0].get('fracture_kind') or ''} fracture visible on {len(pos)} of {len(rows)} images".strip()
    if task == "spine_bmd":
        levels = row.get("levels") or {}
        per = ", ".join(f"{lv} {v.get('class_true', v.get('class'))} {v.get('trabecular_hu', 0):.0f} HU"
                        for lv, v in sorted(levels.items()))
        return f"{row.get('label')} (lowest of L1-L4); {per}" if per else str(row.get("label"))
    if task == "hrpqct_motion":
        grade = int(row.get("grade_true", row.get("label", 0)))
        return (f"{row.get('site', '')} motion grade {grade}".strip()
                + (" (>= 4: rescan)" if grade >= 4 else ""))
    if task == "knee_bone_seg":
        ml = _mask_ml(folder, row)
        order = sorted(ml, key=lambda b: row.get("labels", {}).get(b, 99))  # femur, tibia, fibula
        return ", ".join(f"{b} {ml[b]:.0f} mL" for b in order) if ml else "femur, tibia, fibula masks"
    return str(row.get("label", "-"))


def synthetic_truth(task: str, folder: Path) -> dict[str, str]:
    """Study UID -> the generator's truth for the studies of one task folder (from its labels manifest)."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in _read_manifest(folder):
        by_study.setdefault(str(row.get("study_uid")), []).append(row)
    return {uid: _truth_of(task, rows, folder) for uid, rows in by_study.items()}


# ---------------------------------------------------------------------------------------- output


def table(rows: list[StudyRow], width: int | None = None) -> str:
    """The report table: wrapped finding and truth columns, the study's name and patient over two lines."""
    width = max(100, width or shutil.get_terminal_size((140, 40)).columns)
    w_name = min(32, max([15] + [len(r.name) for r in rows] + [len(r.patient) for r in rows]))
    w_task, w_lat = 15, 9
    rest = width - w_name - w_task - w_lat - 8
    w_find = max(30, rest * 3 // 5)
    w_truth = max(20, rest - w_find)
    head = (f"{'study (patient)':<{w_name}}  {'task':<{w_task}} {'latency':>{w_lat}}  {'AI finding':<{w_find}}  "
            "synthetic truth")
    out = [head, "-" * min(width, len(head) + w_truth)]
    for r in rows:
        left = textwrap.wrap(r.name, w_name) + textwrap.wrap(r.patient, w_name)
        find = textwrap.wrap(r.finding, w_find) or ["-"]
        truth = textwrap.wrap(r.truth, w_truth) or ["-"]
        for i in range(max(len(left), len(find), len(truth))):
            name = left[i] if i < len(left) else ""
            task, lat = (r.task, r.latency) if i == 0 else ("", "")
            f = find[i] if i < len(find) else ""
            t = truth[i] if i < len(truth) else ""
            out.append(f"{name:<{w_name}}  {task:<{w_task}} {lat:>{w_lat}}  {f:<{w_find}}  {t}".rstrip())
    return "\n".join(out)


def write_links(out: Path, rows: list[StudyRow], orthanc_url: str, viewer_url: str | None, note: str) -> list[Path]:
    """Write ``viewer.txt`` and ``index.html`` into ``out``: the viewer's address and a link per study."""
    lines = [f"Orthanc Explorer: {orthanc_url}/app/explorer.html"]
    lines.append(f"OHIF viewer: {viewer_url}" if viewer_url else f"OHIF viewer: not available ({note})")
    lines.append("")
    for r in rows:
        lines.append(f"{r.name}  {r.patient}  {r.task}")
        lines.append(f"  finding: {r.finding}")
        lines.append(f"  truth:   {r.truth}")
        if r.viewer_url:
            lines.append(f"  OHIF:    {r.viewer_url}")
        lines.append(f"  Orthanc: {r.explorer_url}")
    txt = out / "viewer.txt"
    txt.write_text("\n".join(lines) + "\n", encoding="utf-8")

    e = html.escape
    body = []
    for r in rows:
        links = [f'<a href="{e(r.explorer_url)}">Orthanc Explorer</a>']
        if r.viewer_url:
            links.insert(0, f'<a href="{e(r.viewer_url)}">OHIF</a>')
        links += [f'<a href="{e(p)}">overlay {i}</a>' for i, p in enumerate(r.overlays, start=1)]
        body.append(f"<tr><td><b>{e(r.name)}</b><br>{e(r.patient)}</td><td>{e(r.task)}</td><td>{e(r.latency)}</td>"
                    f"<td>{e(r.finding)}</td><td>{e(r.truth)}</td><td>{' &middot; '.join(links)}</td></tr>")
    viewer = (f'<a href="{e(viewer_url)}">{e(viewer_url)}</a>' if viewer_url else f"not available ({e(note)})")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bone-dicomnode demo</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;vertical-align:top;text-align:left}} th{{background:#eee}}</style>
</head><body>
<h1>bone-dicomnode demo</h1>
<p>Synthetic studies only; AI results are not for diagnostic use. The links work while <code>make demo</code> runs.</p>
<p>OHIF viewer: {viewer}<br>Orthanc Explorer: <a href="{e(orthanc_url)}/app/explorer.html">{e(orthanc_url)}/app/explorer.html</a></p>
<table><tr><th>study (patient)</th><th>task</th><th>latency</th><th>AI finding</th><th>synthetic truth</th><th>open</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return [index, txt]
