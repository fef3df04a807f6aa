"""Knee MR generator variation (issue 34): shape modes, pose, patient offsets, findings and scanners vary, so a
pixel-free atlas in patient coordinates cannot segment the bones; findings never change the label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from training.clinic_baselines_knee import atlas_baseline
from training.data import load_records
from training.synth import knee_bone_seg as kb
from training.synth.knee_anatomy import MODE_NAMES, Blob, KneeFindings, KneePose, KneeShape, bone_fields
from training.synth.knee_tissue import Scene, scanner_signals
from training.synth.volume import VolumeGeometry

SMALL = {"n": 72, "pixel_spacing": 2.0, "thickness": 4.0, "n_slices": 20, "orientation": "coronal"}


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def test_coordinate_atlas_fails_on_default_knees_and_works_without_variation(tmp_path: Path) -> None:
    """Leave-one-out atlas in patient coordinates: near useless on default knees (pose and patient offsets vary),
    high on the same knees with the variation switched off (so this test would catch the variation's removal)."""
    kb.generate(tmp_path / "on", 6, 41, workers=1, params=SMALL)
    kb.generate(tmp_path / "off", 6, 41, workers=1, params={**SMALL, "variation": 0})
    on = atlas_baseline(load_records(tmp_path / "on"))
    off = atlas_baseline(load_records(tmp_path / "off"))
    assert on["dice_femur"] < 0.4 and on["dice_tibia"] < 0.4 and on["dice_mean"] < 0.3, on
    assert off["dice_femur"] > 0.8 and off["dice_tibia"] > 0.8, off


def _joint_lps(root: Path, row: dict) -> np.ndarray:
    """Midpoint between the femur's lowest and the tibia's highest voxel (patient z), from the label map alone."""
    img = sitk.ReadImage(str(root / row["mask"]))
    lab = sitk.GetArrayFromImage(img)
    pts = {}
    for value in (1, 2):
        k, r, c = np.nonzero(lab == value)
        idx = np.stack([c, r, k], axis=1).astype(float)
        direction = np.array(img.GetDirection()).reshape(3, 3)
        lps = np.asarray(img.GetOrigin()) + (idx * np.asarray(img.GetSpacing())) @ direction.T
        pts[value] = lps
    fem_low = pts[1][pts[1][:, 2] < pts[1][:, 2].min() + 3.0].mean(axis=0)
    tib_high = pts[2][pts[2][:, 2] > pts[2][:, 2].max() - 3.0].mean(axis=0)
    return (fem_low + tib_high) / 2.0


def test_joint_position_and_pose_vary_across_seeds(tmp_path: Path) -> None:
    rows = _rows(kb.generate(tmp_path, 8, 77, workers=1, params=SMALL))
    joints = np.array([_joint_lps(tmp_path, r) for r in rows])
    assert joints[:, 2].std() > 20.0 and np.ptp(joints[:, 2]) > 50.0, joints  # not at patient z ~ 0
    assert np.abs(joints[:, 0]).min() > 5.0 and np.ptp(joints[:, 0]) > 60.0, joints
    for j, r in zip(joints, rows, strict=True):  # the manifest's joint agrees with the masks
        assert np.linalg.norm(j - np.array(r["pose"]["joint_lps"])) < 15.0
    flexion = [r["pose"]["flexion"] for r in rows]
    assert max(flexion) - min(flexion) > 8.0 and max(flexion) <= 30.0
    # the first slice's position varies in every coordinate (patient origin + off-centre + coverage start)
    first = np.array([pydicom.dcmread(min((tmp_path / r["study_uid"]).glob("*/*.dcm"),
                                          key=lambda f: int(pydicom.dcmread(f).InstanceNumber)))
                      .ImagePositionPatient for r in rows], dtype=float)
    assert (first.std(axis=0) > 15.0).all(), first


def test_shape_modes_are_independent_and_not_tied_to_side_age_or_scanner() -> None:
    modes, side, age = [], [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        a, lat = float(rng.uniform(8, 70)), float(rng.choice([-1.0, 1.0]))
        shape, _, _ = kb.sample_anatomy(rng, a, "F", lat)
        modes.append(shape.modes)
        side.append(lat)
        age.append(a)
    m = np.array(modes)
    assert m.shape[1] == len(MODE_NAMES) >= 12
    assert np.allclose(m.mean(axis=0), 0.0, atol=0.25) and np.allclose(m.std(axis=0), 1.0, atol=0.2)
    corr = np.corrcoef(np.column_stack([m, side, age]), rowvar=False)
    off_diag = corr - np.eye(len(corr))
    assert np.abs(off_diag).max() < 0.2, np.abs(off_diag).max()


def _mask(shape: KneeShape, bone: str, n: int = 64) -> np.ndarray:
    g = np.linspace(-70, 70, n, dtype=np.float32)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    pose = KneePose.build(shape, 0.0, 0.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    q = (x, y, z)
    return bone_fields(q, pose.to_femur(q), shape)[bone] > 0


@pytest.mark.parametrize(("mode", "bone"), [("condyle_width", "femur"), ("femoral_shaft", "femur"),
                                            ("plateau_slope", "tibia"), ("tibial_shaft", "tibia"),
                                            ("fibular_head_height", "fibula"), ("fibular_head_size", "fibula"),
                                            ("tibial_metaphysis", "tibia"), ("patella_height", "patella")])
def test_each_shape_mode_moves_its_bone(mode: str, bone: str) -> None:
    zero = (0.0,) * len(MODE_NAMES)
    moved = tuple(2.0 if name == mode else 0.0 for name in MODE_NAMES)
    a, b = _mask(KneeShape.from_modes(1.0, 1.0, zero), bone), _mask(KneeShape.from_modes(1.0, 1.0, moved), bone)
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice < 0.997, (mode, dice)  # a mode that does nothing gives exactly 1


def test_flexion_rotates_the_femur_and_keeps_the_condyles_on_the_plateau() -> None:
    shape = KneeShape.from_modes(1.0, 1.0, (0.0,) * len(MODE_NAMES))
    for flex in (0.0, 15.0, 30.0):
        pose = KneePose.build(shape, flex, 0.0, 0.0, 0.0, (0.0, 0.0, 0.0))
        shaft = pose.femur_point((0.0, 3.0, 150.0)) - pose.femur_point((0.0, 3.0, 60.0))
        assert np.degrees(np.arctan2(-shaft[1], shaft[2])) == pytest.approx(flex, abs=0.1)
        g = np.linspace(-70, 70, 64, dtype=np.float32)
        x, y, z = np.meshgrid(g, g, g, indexing="ij")
        q = (x, y, z)
        fem = bone_fields(q, pose.to_femur(q), shape)["femur"] > 0
        low = z[fem & (np.abs(x) < 30)].min()
        assert -6.0 < low < 2.0, (flex, low)  # the lowest condyle stays at the joint line


def _render(findings: KneeFindings, seq: int = 1) -> tuple[np.ndarray, np.ndarray]:
    shape = KneeShape.from_modes(1.0, 1.0, (0.0,) * len(MODE_NAMES))
    pose = KneePose.build(shape, 10.0, 0.0, 0.0, -5.0, (30.0, 0.0, 40.0))
    scene = Scene(shape, pose, findings, scanner_signals(None, seq, 3.0, "SIEMENS"), 50.0, False,
                  (65.0, 8.0, 5.0, 0.0))
    n, px, n_sl = 64, 2.0, 12
    geom = kb.place_grid(np.random.default_rng(0), pose, "coronal", n, px, 4.0, 4.0, n_sl, variation=False)
    assert isinstance(geom, VolumeGeometry)
    tex = (np.zeros((n_sl, n, n), np.float32),) * 2
    return kb.render(scene, geom, n, n_sl, tex, np.zeros((n, n), np.float32))


def test_findings_change_the_image_but_never_the_labels() -> None:
    """Effusion, cysts, oedema, Baker cyst and metal are painted; the label maps are the bones' own."""
    plain_sig, plain_lab = _render(KneeFindings())
    lesions = KneeFindings(effusion=1.0, baker=Blob((-15.0, 40.0, -5.0), (9.0, 12.0, 18.0)),
                           cysts=(Blob((15.0, 8.0, -12.0), (4.0, 4.0, 3.0)),),
                           oedema=(Blob((-18.0, 5.0, -10.0), (10.0, 10.0, 8.0)),),
                           metal=Blob((0.0, 5.0, -30.0), (5.0, 5.0, 5.0)))
    sig, lab = _render(lesions)
    assert np.array_equal(lab, plain_lab)
    assert np.abs(sig - plain_sig).max() > 0.5 and (np.abs(sig - plain_sig) > 0.2).sum() > 100
    # osteophytes are bone: they enlarge the label map where they sit
    ost = KneeFindings(osteophytes=(Blob((40.0, 8.0, 8.0), (5.0, 5.0, 5.0), True),))
    _, lab_ost = _render(ost)
    assert (lab_ost == 1).sum() > (plain_lab == 1).sum()


def test_scanner_and_sequence_vary(tmp_path: Path) -> None:
    rows = _rows(kb.generate(tmp_path, 12, 5, workers=1, params={**SMALL, "n_slices": 20}))
    heads = [pydicom.dcmread(next((tmp_path / r["study_uid"]).glob("*/*.dcm")), stop_before_pixels=True)
             for r in rows]
    assert {float(h.MagneticFieldStrength) for h in heads} == {1.5, 3.0}
    assert len({h.SeriesDescription.split(" ")[0] + ("FS" if "FS" in h.SeriesDescription else "")
                for h in heads}) >= 3  # T1, PD fat-sat, PD
    assert len({h.Manufacturer for h in heads}) >= 2
    t1 = scanner_signals(None, 0, 3.0, "SIEMENS")
    fs = scanner_signals(None, 1, 3.0, "SIEMENS")
    assert t1["fat"] > t1["muscle"] > t1["fluid"] and fs["fluid"] > fs["muscle"] > fs["fat"]
