"""Knee MR generator: headers, geometry, dciodvfy, determinism, masks align with the bone signal and grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import MRImageStorage
from scipy.ndimage import binary_erosion, gaussian_filter

from training.synth import knee_bone_seg as kb
from training.synth.knee_anatomy import MODE_NAMES, KneeFindings, KneePose, KneeShape, bone_fields
from training.synth.knee_tissue import SIGNAL, Scene, scanner_signals, tissue_signal

SMALL = {"n": 72, "pixel_spacing": 2.0, "thickness": 4.0, "n_slices": 20}


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]


def _series(root: Path, study_uid: str) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(f) for f in (root / study_uid).glob("*/*.dcm")]
    return sorted(dss, key=lambda d: int(d.InstanceNumber))


@pytest.mark.parametrize("orientation", ["coronal", "sagittal"])
def test_headers_mask_geometry_and_dciodvfy(tmp_path: Path, dciodvfy, orientation: str) -> None:
    (row,) = _rows(kb.generate(tmp_path, 1, 4, workers=1, params={**SMALL, "orientation": orientation}))
    dss = _series(tmp_path, row["study_uid"])
    assert len(dss) == 20 == row["n_slices"]
    first = dss[0]
    assert first.SOPClassUID == MRImageStorage and first.Modality == "MR"
    assert first.BodyPartExamined in {"KNEE", "KNIE", "RODILLA", "GENOU"}
    iop = np.array(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([d.ImagePositionPatient for d in dss], dtype=float)
    step = float(first.SpacingBetweenSlices)
    assert step >= float(first.SliceThickness) == 4.0
    assert np.allclose(np.diff(pos, axis=0), step * normal, atol=1e-3)
    mask = sitk.ReadImage(str(tmp_path / row["mask"]))
    assert mask.GetSize() == (int(first.Columns), int(first.Rows), len(dss))
    assert np.allclose(mask.GetOrigin(), pos[0], atol=1e-3)
    assert np.allclose(mask.GetSpacing(), (*(float(v) for v in first.PixelSpacing[::-1]), step))
    direction = np.array(mask.GetDirection()).reshape(3, 3)
    assert np.allclose(direction[:, 0], iop[:3]) and np.allclose(direction[:, 1], iop[3:])
    # physical point of a voxel agrees with the DICOM geometry
    k, r, c = 7, 10, 30
    expected = pos[k] + c * float(first.PixelSpacing[1]) * iop[:3] + r * float(first.PixelSpacing[0]) * iop[3:]
    assert np.allclose(mask.TransformIndexToPhysicalPoint((c, r, k)), expected, atol=1e-3)
    labels = sitk.GetArrayFromImage(mask)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    dciodvfy(next((tmp_path / row["study_uid"]).glob("*/*.dcm")))


def test_deterministic(tmp_path: Path) -> None:
    a = _rows(kb.generate(tmp_path / "a", 1, 8, workers=1, params=SMALL))
    b = _rows(kb.generate(tmp_path / "b", 1, 8, workers=1, params=SMALL))
    assert a == b
    assert np.array_equal(_series(tmp_path / "a", a[0]["study_uid"])[10].pixel_array,
                          _series(tmp_path / "b", b[0]["study_uid"])[10].pixel_array)
    la = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / a[0]["mask"])))
    lb = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / b[0]["mask"])))
    assert np.array_equal(la, lb)


def test_masks_align_with_bone_signal(tmp_path: Path) -> None:
    rows = _rows(kb.generate(tmp_path, 3, 30, workers=1, params={**SMALL, "orientation": "coronal"}))
    for row in rows:
        img = np.stack([d.pixel_array for d in _series(tmp_path, row["study_uid"])]).astype(float)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / row["mask"])))
        bone = lab > 0
        # the mask's outline lies on the bone's edge (cortex/cartilage/soft-tissue contrast): the in-plane
        # gradient is stronger on its boundary than on the boundary of the same mask shifted by a few voxels
        grad = np.hypot(*np.gradient(gaussian_filter(img, (0, 0.7, 0.7)), axis=(1, 2)))

        def edge(m: np.ndarray) -> np.ndarray:
            return m & ~binary_erosion(m, structure=np.ones((1, 3, 3)))

        on = grad[edge(bone)].mean()
        for shift in (-5, 5):
            for axis in (1, 2):
                assert on > 1.3 * grad[edge(np.roll(bone, shift, axis=axis))].mean()
        assert row["voxels"]["fibula"] > 0 and row["voxels"]["femur"] > row["voxels"]["fibula"]


def test_growth_plate_open_only_when_young() -> None:
    z = np.linspace(-60, 60, 1201, dtype=np.float32)
    pts = (np.zeros_like(z), np.full_like(z, 4.0), z)
    shape = KneeShape.from_modes(1.0, 1.0, (0.0,) * len(MODE_NAMES))
    pose = KneePose.build(shape, 0.0, 0.0, 0.0, 0.0, (0.0, 0.0, 0.0))
    qf = pose.to_femur(pts)
    fields = bone_fields(pts, qf, shape)
    physis = SIGNAL["physis"][1]
    for seq in (0, 1, 2):
        sig = scanner_signals(None, seq, 3.0, "SIEMENS")
        limb = (70.0, 8.0, 5.0, 0.0)
        open_ = tissue_signal(Scene(shape, pose, KneeFindings(), sig, 12.0, True, limb), pts, qf, fields)
        closed = tissue_signal(Scene(shape, pose, KneeFindings(), sig, 40.0, False, limb), pts, qf, fields)
        band = np.isclose(open_, SIGNAL["physis"][seq])
        assert band.sum() >= 4 and not np.isclose(closed, SIGNAL["physis"][seq]).any()
        # two plates: distal femur above the joint, proximal tibia below
        assert (z[band] > 10).any() and (z[band] < -10).any()
    assert physis > SIGNAL["marrow"][1]


def test_preview_outlines_each_slice_s_own_label_map(tmp_path: Path) -> None:
    """The contact sheet finds the label-map slice under each DICOM slice by geometry (both orientations),
    and outlines femur, tibia and fibula in their colours."""
    from PIL import Image

    from training.synth.preview import _MASK_COLOURS, MaskSlicer, sheet_from_folder

    for orientation in ("coronal", "sagittal"):
        root = tmp_path / orientation
        (row,) = _rows(kb.generate(root, 1, 4, workers=1, params={**SMALL, "orientation": orientation}))
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(root / row["mask"])))
        slicer = MaskSlicer(root)
        for k, ds in enumerate(_series(root, row["study_uid"])):
            assert np.array_equal(slicer(row, ds), labels[k])
        assert slicer({k: v for k, v in row.items() if k != "mask"}, ds) is None
    png = sheet_from_folder(tmp_path / "coronal", tmp_path / "sheet.png", per_series=16)
    px = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    for value in (1, 2, 3):  # femur, tibia, fibula: the 16 middle coronal slices show all three
        assert (px == _MASK_COLOURS[value - 1]).all(axis=1).sum() > 20, value
