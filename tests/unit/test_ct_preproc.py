"""Tests of CT pre-processing (inference.ct) on constructed datasets and volumes."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference import ct
from inference.errors import InvalidDatasetError


def ct_ds(stored: np.ndarray, intercept: float = -1024.0, slope: float = 1.0, modality: str = "CT") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.set_pixel_data(stored.astype(np.uint16), "MONOCHROME2", 12)
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    return ds


def test_hu_from_rescale() -> None:
    stored = np.array([[0, 1024, 1224, 2024]], dtype=np.uint16)
    np.testing.assert_allclose(ct.hu(ct_ds(stored)), [[-1024, 0, 200, 1000]])


def test_hu_rejects_other_modalities() -> None:
    with pytest.raises(InvalidDatasetError):
        ct.hu(ct_ds(np.zeros((4, 4)), modality="MR"))


def test_bone_window_constants() -> None:
    assert ct.BONE_WINDOW == {"center": 500.0, "width": 2000.0}
    out = ct.bone_window(np.array([-500.0, 500.0, 1500.0, -1000.0, 3000.0]))
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 0.0, 1.0], atol=1e-3)


def spine_volume(n: int = 40, rows: int = 64, cols: int = 80, dz: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """Soft tissue with a vertical bone column at columns 36-44 whose HU grows with z."""
    pos = 100.0 + dz * np.arange(n)
    vol = np.full((n, rows, cols), 40.0, dtype=np.float32)
    for k in range(n):
        vol[k, 20:40, 36:45] = 250.0 + k  # vertebral column, HU encodes the slice
    vol[:, 30:34, 5:8] = 400.0  # a rib far to the side
    return vol, pos


def test_midline_column_finds_spine() -> None:
    vol, _ = spine_volume()
    assert 36 <= ct.spine_midline_column(vol) <= 44


@pytest.mark.parametrize("shuffle", [False, True])
def test_sagittal_reformat_orientation_and_interpolation(shuffle: bool) -> None:
    vol, pos = spine_volume()
    if shuffle:  # slices need not be sorted
        perm = np.random.default_rng(0).permutation(len(pos))
        vol, pos = vol[perm], pos[perm]
    sag = ct.sagittal_reformat(vol, pos, (0.5, 0.5))
    assert sag.spacing == (0.5, 0.5)
    # 39 gaps of 2.5 mm at 0.5 mm -> 196 rows; columns are the axial rows
    assert sag.image.shape == (196, 64)
    assert 36 <= sag.column <= 44
    # top row is the most superior slice (largest position, HU 250 + 39)
    assert sag.image[0, 30] == pytest.approx(289.0)
    assert sag.image[-1, 30] == pytest.approx(250.0)
    # halfway between two slices is linearly interpolated
    assert sag.image[1, 30] == pytest.approx(289.0 - 0.2, abs=1e-4)
    assert sag.image[0, 5] == pytest.approx(40.0)


def test_sagittal_row_slice_mapping_round_trip() -> None:
    vol, pos = spine_volume()
    sag = ct.sagittal_reformat(vol, pos, (0.5, 0.5), column=40)
    for k in (0, 7, 39):
        row = sag.slice_to_row(k)
        assert float(sag.row_to_slice(row)) == pytest.approx(k, abs=1e-6)
    assert float(sag.slice_to_row(39)) == pytest.approx(0.0)


def test_sagittal_needs_two_positions() -> None:
    vol, pos = spine_volume(n=2)
    with pytest.raises(InvalidDatasetError):
        ct.sagittal_reformat(vol, np.array([5.0, 5.0]), (0.5, 0.5))


def test_mid_slice_indices() -> None:
    pos = np.arange(0.0, 30.0, 3.0)  # 0, 3, ..., 27
    assert ct.mid_slice_indices(pos, 6.0, 18.0, count=3) == [3, 4, 5]
    assert ct.mid_slice_indices(pos[::-1], 6.0, 18.0, count=1) == [5]
    assert ct.mid_slice_indices(pos, 100.0, 120.0) == [9]


def test_trabecular_roi_excludes_cortex() -> None:
    img = np.full((100, 100), -100.0, dtype=np.float32)  # fat around
    img[20:80, 30:70] = 900.0  # cortical shell
    img[24:76, 34:66] = 120.0  # trabecular core
    stats = ct.trabecular_roi(img, (30, 20, 70, 80))
    assert stats.mean_hu == pytest.approx(120.0)
    assert stats.std_hu == pytest.approx(0.0)
    assert stats.n_voxels > 100
    x0, y0, x1, y1 = stats.box
    assert (x0, y0, x1, y1) == pytest.approx((40, 35, 60, 65))


def test_trabecular_roi_over_slices_and_range_filter() -> None:
    vol = np.stack([np.full((50, 50), v, dtype=np.float32) for v in (100.0, 200.0)])
    vol[0, 25, 25] = 3000.0  # metal voxel is ignored
    assert ct.trabecular_roi(vol, (10, 10, 40, 40)).mean_hu == pytest.approx(150.0, abs=0.5)
    with pytest.raises(ValueError):
        ct.trabecular_roi(np.full((20, 20), -1000.0), (5, 5, 15, 15))
