"""Lumbar CT generator: headers, geometry, dciodvfy, determinism, HU in the boxes tracks the class."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage

from training.synth import spine_bmd as sb
from training.synth import spine_truth as st
from training.synth.common import SynthError, new_patient

SMALL = {"n": 96, "pixel_spacing": 2.0, "thickness": 3.0}


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _by_sop(root: Path, study_uid: str) -> dict[str, pydicom.Dataset]:
    return {f.stem: pydicom.dcmread(f) for f in (root / study_uid).glob("*/*.dcm")}


def test_headers_geometry_and_dciodvfy(tmp_path: Path, dciodvfy) -> None:
    (row,) = _rows(sb.generate(tmp_path, 1, 5, workers=1, params=SMALL))
    dss = sorted(_by_sop(tmp_path, row["study_uid"]).values(), key=lambda d: int(d.InstanceNumber))
    assert 20 <= len(dss) == row["n_slices"] <= 120
    first = dss[0]
    assert first.SOPClassUID == CTImageStorage and first.Modality == "CT"
    assert float(first.RescaleIntercept) == -1024.0 and float(first.RescaleSlope) == 1.0
    assert first.RescaleType == "HU"
    assert first.BodyPartExamined in {"LSPINE", "SPINE", "ABDOMEN", "LWS", "LUMBAR SPINE", "COLUMNA LUMBAR",
                                      "WIRBELSAULE", "BAUCH"}
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([d.ImagePositionPatient for d in dss], dtype=float)
    assert np.allclose(np.diff(pos, axis=0), 3.0 * normal, atol=1e-3)
    assert float(first.SliceThickness) == 3.0
    assert set(row["vertebrae"]) == {"L1", "L2", "L3", "L4"}
    assert row["label"] == max(row["vertebrae"].values(), key=sb.CLASSES.index)
    sops = {d.SOPInstanceUID for d in dss}
    for lv in row["levels"].values():
        assert set(lv["mid_sops"]) <= sops
        assert lv["slices"][0] <= min(lv["mid_slices"]) <= max(lv["mid_slices"]) <= lv["slices"][1]
    assert {b["sop_instance_uid"] for b in row["boxes"]} <= sops
    dciodvfy(next((tmp_path / row["study_uid"]).glob("*/*.dcm")))


def test_deterministic(tmp_path: Path) -> None:
    a = _rows(sb.generate(tmp_path / "a", 1, 9, workers=1, params=SMALL))
    b = _rows(sb.generate(tmp_path / "b", 1, 9, workers=1, params=SMALL))
    assert a == b
    sop = a[0]["boxes"][0]["sop_instance_uid"]
    pa = _by_sop(tmp_path / "a", a[0]["study_uid"])[sop].pixel_array
    pb = _by_sop(tmp_path / "b", b[0]["study_uid"])[sop].pixel_array
    assert np.array_equal(pa, pb)


def _box_hu(root: Path, row: dict) -> dict[str, float]:
    dss = _by_sop(root, row["study_uid"])
    means: dict[str, list[float]] = {}
    for b in row["boxes"]:
        ds = dss[b["sop_instance_uid"]]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        cx, cy = (b["x0"] + b["x1"]) / 2, (b["y0"] + b["y1"]) / 2
        w, h = (b["x1"] - b["x0"]) / 4, (b["y1"] - b["y0"]) / 4
        roi = hu[int(round(cy - h)):int(round(cy + h)) + 1, int(round(cx - w)):int(round(cx + w)) + 1]
        means.setdefault(b["label"], []).append(float(roi.mean()))
    return {k: float(np.mean(v)) for k, v in means.items()}


def test_box_hu_matches_the_manifest(tmp_path: Path) -> None:
    """The box centre on the mid-body slices reads the measured trabecular HU the manifest records.

    The class is not a function of that HU (tests/unit/test_synth_spine_truth.py), so this test checks that the
    manifest describes the image, and that the box lies on bone well above soft tissue.
    """
    (row,) = _rows(sb.generate(tmp_path, 1, 20, workers=1, label_noise=0.0,
                               params={**SMALL, "no_fractures": 1, "phase": "native"}))
    dss = _by_sop(tmp_path, row["study_uid"])
    for lv, info in row["levels"].items():
        vals = []
        for b in row["boxes"]:
            if b["level"] != lv:
                continue
            hu = _hu(dss[b["sop_instance_uid"]])
            cx, cy = (b["x0"] + b["x1"]) / 2, (b["y0"] + b["y1"]) / 2
            w, h = (b["x1"] - b["x0"]) / 5, (b["y1"] - b["y0"]) / 5
            vals.append(hu[int(round(cy - h)):int(round(cy + h)) + 1, int(round(cx - w)):int(round(cx + w)) + 1].mean())
        assert abs(np.mean(vals) - info["trabecular_hu"]) < 25.0, (lv, vals, info["trabecular_hu"])
        assert np.mean(vals) > 20.0


def test_parameter_space_spans_every_class() -> None:
    rng = np.random.default_rng(1)
    per_vertebra: Counter[str] = Counter()
    for _ in range(500):
        p = new_patient(rng, sb.AGE_RANGE)
        per_vertebra.update(sb.who_class(float(t)) for t in sb.draw_t_scores(rng, p.age_years, p.sex)[:4])
    assert all(per_vertebra[c] > 100 for c in sb.CLASSES)
    assert sb.who_class(-1.0) == "normal" and sb.who_class(-2.5) == "osteoporosis"
    assert sb.who_class(-1.01) == "osteopenia"
    # the population mean relation puts the 160/110 HU rule's cuts at the WHO cut-offs
    assert st.trabecular_hu(-1.0) == 160.0 and abs(st.trabecular_hu(-2.5) - 110.5) < 1


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_contrast_enhances_vessels_and_organs_not_the_bone(tmp_path: Path, dciodvfy) -> None:
    """Same study drawn native and portal venous (same anatomy and noise): organs and vessels change, and the
    trabecular bone gains the study's small bone enhancement (a confounder of the ROI HU rule).

    The aorta is where the difference equals the drawn aortic enhancement: a disc in front of every vertebral
    body, separated from it; inside the body the difference is the manifest's bone enhancement.
    """
    rows, dss = {}, {}
    for phase in ("native", "portal_venous"):
        (rows[phase],) = _rows(sb.generate(tmp_path / phase, 1, 31, workers=1, params={**SMALL, "phase": phase}))
        dss[phase] = _by_sop(tmp_path / phase, rows[phase]["study_uid"])
    native, portal = rows["native"], rows["portal_venous"]
    assert native["contrast"]["phase"] == "native" and portal["contrast"]["phase"] == "portal_venous"
    assert native["boxes"] == portal["boxes"] and native["vertebrae"] == portal["vertebrae"]
    bone_gain = portal["contrast"]["bone_enhancement_hu"]
    assert native["contrast"]["bone_enhancement_hu"] == 0.0 and 6.0 < bone_gain < 40.0
    for lv, info in native["levels"].items():
        assert portal["levels"][lv]["trabecular_hu"] - info["trabecular_hu"] == pytest.approx(bone_gain, abs=0.2)
    gain = portal["contrast"]["aorta_hu"] - native["contrast"]["aorta_hu"]
    assert gain > 70
    px = SMALL["pixel_spacing"]
    for box in native["boxes"]:
        diff = _hu(dss["portal_venous"][box["sop_instance_uid"]]) - _hu(dss["native"][box["sop_instance_uid"]])
        rr, cc = np.nonzero(np.abs(diff - gain) <= 3.0)
        near = (cc >= box["x0"] - 5.0 / px) & (cc <= box["x1"] + 5.0 / px)  # the kidneys lie further lateral
        rr, cc = rr[near], cc[near]
        assert len(rr) >= 0.5 * np.pi * (9.0 / px) ** 2, box  # at least half the smallest aortic lumen
        assert rr.max() < box["y0"] - 1.0, box  # in front of the body, with a gap
        cx, cy = (box["x0"] + box["x1"]) / 2, (box["y0"] + box["y1"]) / 2
        w, h = (box["x1"] - box["x0"]) / 6, (box["y1"] - box["y0"]) / 6
        body = diff[int(round(cy - h)):int(round(cy + h)) + 1, int(round(cx - w)):int(round(cx + w)) + 1]
        assert np.median(body) == pytest.approx(bone_gain, abs=2.0)  # trabecular bone: the bone enhancement
    some = next(iter(dss["portal_venous"].values()))
    assert some.ContrastBolusRoute == "IV" and "Iomeprol" in some.ContrastBolusAgent
    dciodvfy(next((tmp_path / "portal_venous" / portal["study_uid"]).glob("*/*.dcm")))  # Contrast/Bolus module
    if not native["contrast"]["oral_contrast"]:
        assert "ContrastBolusAgent" not in next(iter(dss["native"].values()))
    with pytest.raises(SynthError, match="'phase' must be one of native, arterial, portal_venous"):
        sb.generate(tmp_path / "bad", 1, 31, workers=1, params={**SMALL, "phase": "delayed"})


def test_confounders_do_not_depend_on_the_class(tmp_path: Path) -> None:
    """Phases and oral contrast are spread over the classes, in about the configured proportions."""
    rows = _rows(sb.generate(tmp_path, 30, 12, workers=2, params=SMALL))
    phases = Counter(r["contrast"]["phase"] for r in rows)
    assert set(phases) == set(sb.PHASES) and phases["native"] < 20
    by_class: dict[str, Counter[str]] = {}
    for r in rows:
        by_class.setdefault(r["label"], Counter())[r["contrast"]["phase"] != "native"] += 1
    assert sum(c[True] for c in by_class.values()) >= 15
    assert sum(1 for c in by_class.values() if c[True]) >= 2  # enhanced studies in more than one class
    assert any(r["contrast"]["oral_contrast"] for r in rows) and any(r["contrast"]["aortic_plaques"] for r in rows)


def test_preview_shows_the_labelled_mid_body_slices(tmp_path: Path) -> None:
    """A CT's contact sheet shows slices with vertebral boxes (spread over the levels), not its first slices."""
    from training.synth.preview import _boxes_by_sop, _chosen_files, sheet_from_folder

    rows = _rows(sb.generate(tmp_path / "d", 2, 4, workers=1, params=SMALL))
    boxes = _boxes_by_sop(rows)
    chosen = list(_chosen_files(tmp_path / "d", boxes, per_series=3))
    assert len(chosen) == 6 and all(f.stem in boxes for f in chosen)
    levels = {b["level"] for f in chosen for b in boxes[f.stem]}
    assert len(levels) >= 2
    png = sheet_from_folder(tmp_path / "d", tmp_path / "sheet.png", per_series=3)
    assert png.stat().st_size > 10_000
