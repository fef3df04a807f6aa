"""Synthetic radiographs: projection physics, DICOM conformance, determinism, labels and routing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from training.synth import radiograph as rg
from training.synth import wrist_fracture
from training.synth import wrist_phantom as wp
from training.synth.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


@pytest.fixture(scope="module")
def wrist_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wrist")
    wrist_fracture.generate(out, 6, 11, workers=1, params=None)
    return out


def test_chord_of_ellipsoid_is_exact() -> None:
    det = rg.Detector(rows=41, cols=41, pixel_mm=0.5)
    sphere = rg.Part(np.zeros(3), np.eye(3), (5.0, 5.0, 5.0), 1.0)
    li = rg.project([sphere], np.eye(3), det)
    assert li[20, 20] == pytest.approx(10.0, rel=1e-5)  # centre pixel (0.25 mm off) ~ diameter
    x = (np.arange(41) + 0.5 - 20.5) * 0.5
    expected = 2 * np.sqrt(np.clip(25 - x[None, :] ** 2 - x[:, None] ** 2, 0, None))
    np.testing.assert_allclose(li, expected, atol=5e-3)
    half = sphere.clipped(np.array([0.0, 0.0, 1.0]), 0.0)  # keep z <= 0
    np.testing.assert_allclose(rg.project([half], np.eye(3), det), expected / 2, atol=5e-3)
    cut = sphere.clipped(np.array([1.0, 0.0, 0.0]), 0.0)  # keep x <= 0: plane parallel to the rays
    got = rg.project([cut], np.eye(3), det)
    assert got[:, x > 0].max() == 0 and got[20, 19] == pytest.approx(expected[20, 19])


def _marched_chord(part: rg.Part, x: float, y: float, t_max: float = 80.0, n: int = 64001) -> float:
    t = np.linspace(-t_max, t_max, n)
    pts = np.stack([np.full(n, x), np.full(n, y), t], axis=1)
    return float(rg.inside(part, pts).sum() * (t[1] - t[0]))


@pytest.mark.parametrize("infinite", [-1, 1])
def test_chord_of_rotated_clipped_part_matches_ray_marching(infinite: int) -> None:
    """Oblique clip planes (cutting the rays), one parallel to the rays, a rotated ellipsoid or cylinder."""
    axes = rg.rot("x", 35.0) @ rg.rot("z", 25.0) @ rg.rot("y", 15.0)
    part = rg.Part(np.array([1.5, -2.0, 3.0]), axes, (6.0, 9.0, 4.0), 1.0, infinite)
    n1 = rg.rot("x", 40.0) @ np.array([0.0, 1.0, 0.0])
    n2 = rg.rot("y", 50.0) @ np.array([-1.0, 0.0, 0.0])
    part = part.clipped(n1, float(n1 @ part.center) + 2.0).clipped(n2, 3.0).clipped(np.array([1.0, 0.3, 0.0]), 4.0)
    if infinite >= 0:  # the bounding box ends an unclipped cylinder: clip it on the other side too
        part = part.clipped(-n1, -(float(n1 @ part.center) - 12.0))
    rng = np.random.default_rng(2)
    xs = rng.uniform(-10, 10, 40).astype(np.float32)
    ys = rng.uniform(-14, 10, 40).astype(np.float32)
    got = rg.chord(part, xs[None, :], ys[:, None])
    for i in range(0, 40, 7):
        for j in range(0, 40, 3):
            assert got[i, j] == pytest.approx(_marched_chord(part, float(xs[j]), float(ys[i])), abs=0.02)
    assert (got > 0).mean() > 0.2 and (got == 0).mean() > 0.1  # both hits and misses were checked


def test_headers_conform_and_dciodvfy_is_clean(wrist_small: Path, dciodvfy: Callable[[Path], None]) -> None:
    files = _files(wrist_small)
    assert len(files) >= 6
    sops = set()
    for f in files:
        ds = pydicom.dcmread(f)
        sops.add(ds.SOPInstanceUID)
        assert ds.SOPClassUID in (DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage)
        assert ds.Modality == ("DX" if ds.SOPClassUID == DigitalXRayImageStorageForPresentation else "CR")
        assert f.parent.name == ds.SeriesInstanceUID and f.parent.parent.name == ds.StudyInstanceUID
        assert ds.PatientAge.endswith("Y") and 18 <= int(ds.PatientAge[:3]) <= 90
        assert ds.StudyDate >= ds.PatientBirthDate and len(ds.StudyDate) == 8
        assert ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2") and ds.BitsStored in (12, 14, 16)
        assert int(ds.pixel_array.max()) < (1 << ds.BitsStored) and ds.ViewPosition in ("PA", "LL")
        assert 512 <= max(ds.Rows, ds.Columns) <= 1024 and ds.ImagerPixelSpacing
        assert "WindowCenter" in ds and "BodyPartExamined" in ds
        # LINEAR is the default; an explicit LINEAR makes OHIF 3.x show the image black ("Invalid VOI LUT function")
        assert "VOILUTFunction" not in ds
    assert len(sops) == len(files)
    for f in files[:4]:
        dciodvfy(f)


def test_routed_to_wrist_fracture(wrist_small: Path) -> None:
    from dicomnode.config import load_config
    from dicomnode.router import SeriesInfo, route_series

    cfg = load_config(REPO / "config" / "node.yaml")
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for f in _files(wrist_small):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    for datasets in by_series.values():
        routes = route_series(SeriesInfo.from_datasets(datasets), cfg.routes)
        assert [r.task for r in routes] == ["wrist_fracture"]


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = wrist_fracture.generate(tmp_path / "a", 3, 5, workers=1)
    b = wrist_fracture.generate(tmp_path / "b", 3, 5, workers=2)
    assert a.read_text() == b.read_text()
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert [f.relative_to(tmp_path / "a") for f in fa] == [f.relative_to(tmp_path / "b") for f in fb]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb, strict=True))
    c = wrist_fracture.generate(tmp_path / "c", 3, 6, workers=1)
    assert {f.name for f in _files(tmp_path / "c")}.isdisjoint({f.name for f in fa})
    assert c.read_text() != a.read_text()


@pytest.mark.parametrize("difficulty", [0.2, 0.8])
def test_fracture_box_lies_on_the_fracture(difficulty: float) -> None:
    """The box marks where the fractured radius differs from the same radius intact."""
    from training.synth import fractures as fr

    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(16):
        w = wp.wrist_anatomy(rng, float(rng.uniform(20, 80)))
        fx = fr.wrist_fracture(rng, w, difficulty)
        broken, _, sites = fr.apply(fx, w.radius, w.epiphyses, w.other)
        assert len(sites["radius"]) > 50
        for lateral in (False, True):
            view = rg.view_matrix(lateral, float(rng.normal(0, 6)))
            det = rg.Detector(320, 256, 0.6, cy=-8)
            if not fr.visible_sites(fx, view)["radius"]:
                continue
            box = rg.box_of_points(sites["radius"], view, det)
            assert box is not None
            intact = rg.project(w.radius, view, det)
            r0, r1, c0, c1 = int(box["y0"]), int(box["y1"]) + 1, int(box["x0"]), int(box["x1"]) + 1
            assert intact[r0:r1, c0:c1].max() > 0.5  # the box is on the radius
            # the gaps alone change the image only inside the box
            still = fr.Fracture(fx.kind, [dataclasses.replace(c, delta=np.zeros(3), angle=0.0) for c in fx.cuts
                                          if c.site == "radius"])
            gap_only, _, _ = fr.apply(still, w.radius, w.epiphyses, w.other)
            diff = np.abs(rg.project(gap_only, view, det) - intact)
            assert diff.sum() > 0 and diff[r0:r1, c0:c1].sum() >= 0.95 * diff.sum()
            # with the displacement, the fracture site inside the box changes clearly
            moved = np.abs(rg.project(broken, view, det) - intact)
            assert moved[r0:r1, c0:c1].max() > 0.02
            checked += 1
    assert checked >= 8


@pytest.fixture(scope="module")
def wrist_hundred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wrist100")
    wrist_fracture.generate(out, 100, 2024, workers=2, label_noise=0.0)
    return out


def test_both_classes_and_boxes(wrist_hundred: Path) -> None:
    rows = read_manifest(wrist_hundred)
    labels = np.array([r["label"] for r in rows])
    assert len(rows) == 100 and 0.18 <= labels.mean() <= 0.45
    pos = [r for r in rows if r["label"] == 1]
    assert all(not r["boxes"] for r in rows if r["label"] == 0)
    with_box = [r for r in pos if r["boxes"]]
    assert 0.6 * len(pos) <= len(with_box)  # usually visible in at least one view
    for r in rows:  # the per-view flag says where the boxes are
        assert {v["sop_instance_uid"] for v in r["views"] if v["fracture_visible"]} == {
            b["sop_instance_uid"] for b in r["boxes"]}
    one_view = [r for r in pos if len(r["boxes"]) == 1]
    assert one_view, "some fractures must be visible in one view only"
    shapes = {}
    for f in _files(wrist_hundred):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        shapes[ds.SOPInstanceUID] = (ds.Rows, ds.Columns)
    for r in with_box:
        for b in r["boxes"]:
            h, w = shapes[b["sop_instance_uid"]]
            assert 0 <= b["x0"] < b["x1"] <= w and 0 <= b["y0"] < b["y1"] <= h


def test_histogram_baseline_stays_near_chance(wrist_hundred: Path) -> None:
    """Logistic regression on intensity histograms (``dicomnode-train baseline``) must not solve the task."""
    from training.baseline import run_baseline

    result = run_baseline("wrist_fracture", wrist_hundred)
    assert result["n"] == result["patients"] == 100 and min(result["class_counts"]) >= 20
    assert result["auc"] < 0.7


@pytest.fixture(scope="module")
def physis_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synth import physis_fracture

    out = tmp_path_factory.mktemp("physis")
    physis_fracture.generate(out, 24, 7, workers=2, label_noise=0.0)
    return out


def test_physis_headers_routing_and_dciodvfy(physis_set: Path, dciodvfy: Callable[[Path], None]) -> None:
    from dicomnode.config import load_config
    from dicomnode.router import SeriesInfo, route_series

    cfg = load_config(REPO / "config" / "node.yaml")
    files = _files(physis_set)
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert 2 <= int(ds.PatientAge[:3]) <= 17 and (ds.Rows, ds.Columns) == (1024, 768)
        assert "VOILUTFunction" not in ds  # LINEAR is the default (see the wrist test)
        assert [r.task for r in route_series(SeriesInfo.from_datasets([ds]), cfg.routes)] == ["physis_fracture"]
    for f in files[:3]:
        dciodvfy(f)


def test_physis_labels_boxes_and_distractors(physis_set: Path) -> None:
    from training.synth import physis_fracture

    rows = read_manifest(physis_set)
    assert all(r.get("sop_instance_uid") for r in rows)
    labels = {r["label"] for r in rows}
    assert labels == {0, 1}
    kinds = {lab["label"] for r in rows for lab in r["boxes"]}
    assert {"fracture", "text"} <= kinds
    for r in rows:
        has_fx = any(b["label"] == "fracture" for b in r["boxes"])
        assert has_fx == bool(r["label"])  # no label noise here: image label == fracture box present
        if r["label"]:
            assert r["study_fracture"] == 1 and r["fracture_kind"] in physis_fracture.KINDS
        assert r["fracture_visible"] == r["label_true"] == r["label"] and r["view_position"] in ("PA", "LL")
    # metal occurs in both classes somewhere in a larger parameter sweep (no pixels needed)
    rng = np.random.default_rng(0)
    w = wp.wrist_anatomy(rng, 9.0)
    assert w.physis_y is not None and w.physis_width > 0.8 and w.epiphyses
    old = wp.wrist_anatomy(np.random.default_rng(0), 16.5)
    assert old.physis_width < w.physis_width
    parts, pts = physis_fracture.metal(rng, w)
    assert all(p.mu == rg.MU_STEEL for p in parts) and len(pts) >= 2


@pytest.mark.parametrize("kind", ["buckle", "greenstick", "metaphyseal", "sh1", "sh2", "sh3", "sh4"])
def test_physis_fracture_box_covers_the_change(kind: str) -> None:
    from training.synth import fractures as fr

    rng = np.random.default_rng(5)
    for _ in range(400):
        w = wp.wrist_anatomy(rng, float(rng.uniform(5, 15)))
        fx = fr.paediatric_fracture(rng, w, 0.3)
        views = [v for v in (rg.view_matrix(False, 0.0), rg.view_matrix(True, 0.0)) if fr.visible_in(fx, v)]
        if fx.kind == kind and views:
            break
    assert fx.kind == kind
    broken, _, sites = fr.apply(fx, w.radius, w.epiphyses, w.other)
    view = views[0]
    det = rg.Detector(400, 300, 0.3, cx=w.radius_x if view[0, 0] > 0.5 else 0.0, cy=w.physis_y or 0.0)
    box = rg.box_of_points(sites["radius"], view, det)
    assert box is not None
    intact = rg.project([*w.radius, *w.epiphyses], view, det)
    diff = np.abs(rg.project(broken, view, det) - intact)
    r0, r1, c0, c1 = int(box["y0"]), int(box["y1"]) + 1, int(box["x0"]), int(box["x1"]) + 1
    assert diff[r0:r1, c0:c1].max() > 0.02
    assert intact[r0:r1, c0:c1].max() > 0.3


def test_cli_writes_studies_manifest_and_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    out, png = tmp_path / "out", tmp_path / "sheet.png"
    rc = main(["synth", "wrist_fracture", "--out", str(out), "--n", "2", "--seed", "4", "--workers", "1",
               "--difficulty", "0.3", "--preview", str(png)])
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out / "labels.jsonl")
    assert len(read_manifest(out)) == 2 and _files(out)
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= 256 and im.height >= 256
    rc = main(["synth", "wrist_fracture", "--out", str(tmp_path / "bad"), "--n", "1", "--difficulty", "3"])
    assert rc == 2 and not (tmp_path / "bad" / "labels.jsonl").exists()


def test_cli_default_difficulty_is_the_tasks_calibrated_one(tmp_path: Path) -> None:
    from training.cli import main
    from training.synth.cli import GENERATORS, default_difficulty, load_generator

    # wrist's and physis's defaults come from the fracture mix of emergency practice (training/README.md)
    assert {t: default_difficulty(load_generator(t)) for t in GENERATORS} == {
        "wrist_fracture": 0.3, "physis_fracture": 0.5, "spine_bmd": 0.5, "hrpqct_motion": 0.5, "knee_bone_seg": 0.5}
    assert main(["synth", "wrist_fracture", "--out", str(tmp_path / "cli"), "--n", "1", "--seed", "4",
                 "--workers", "1"]) == 0
    for d in (0.3, 0.7):
        wrist_fracture.generate(tmp_path / f"d{d}", 1, 4, workers=1, difficulty=d)

    def pixels(root: Path) -> list[bytes]:
        return [pydicom.dcmread(f).PixelData for f in _files(root)]

    assert pixels(tmp_path / "cli") == pixels(tmp_path / "d0.3") != pixels(tmp_path / "d0.7")
