"""Tests of the DICOM pixel pipeline (inference.pixels) on constructed datasets."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from inference.errors import InvalidDatasetError
from inference.pixels import apply_window, display_array, modality_values, number_of_frames, voi_window


def make_ds(arr: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12, signed: bool = False) -> Dataset:
    """A minimal greyscale dataset holding ``arr`` (2-D, or 3-D for multi-frame)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    dtype = np.int16 if signed else np.uint16
    ds.set_pixel_data(arr.astype(dtype), photometric, bits)
    return ds


def ramp(rows: int = 32, cols: int = 48) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) % 4096).astype(np.uint16)


def test_rescale_applied() -> None:
    arr = ramp()
    ds = make_ds(arr)
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1024
    values = modality_values(ds)
    assert values.dtype == np.float32
    np.testing.assert_allclose(values, arr.astype(np.float32) * 2 - 1024)


def test_modality_lut_sequence_applied() -> None:
    arr = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    ds = make_ds(arr)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [10, 20, 30, 40]
    ds.ModalityLUTSequence = Sequence([item])
    np.testing.assert_allclose(modality_values(ds), [[10, 20], [30, 40]])


def test_no_rescale_returns_stored_values() -> None:
    arr = ramp()
    np.testing.assert_array_equal(modality_values(make_ds(arr)), arr.astype(np.float32))


def test_window_applied_linear() -> None:
    values = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0], dtype=np.float32)
    out = apply_window(values, 40, 80)
    assert out[0] == 0.0 and out[-1] == 1.0
    assert out[2] == pytest.approx(0.5, abs=0.01)
    assert out[1] == pytest.approx(0.0, abs=0.01) and out[3] == pytest.approx(1.0, abs=0.01)


def test_display_uses_header_window_after_rescale() -> None:
    arr = np.array([[0, 1024, 1064, 1104, 4095]], dtype=np.uint16)
    ds = make_ds(arr)
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    assert voi_window(ds) == (40.0, 80.0)
    out = display_array(ds)
    assert out[0, 0] == 0.0 and out[0, -1] == 1.0
    assert out[0, 2] == pytest.approx(0.5, abs=0.01)


def test_multivalued_window_takes_first() -> None:
    ds = make_ds(ramp())
    ds.WindowCenter = [100, 300]
    ds.WindowWidth = [50, 400]
    assert voi_window(ds) == (100.0, 50.0)


def test_invalid_window_width_ignored() -> None:
    ds = make_ds(ramp())
    ds.WindowCenter = 100
    ds.WindowWidth = 0
    assert voi_window(ds) is None


def test_percentile_range_without_voi() -> None:
    arr = np.full((100, 100), 1000, dtype=np.uint16)
    arr[:50] = 2000
    arr[0, 0] = 4095  # outlier above the 99.5th percentile
    arr[99, 99] = 0  # outlier below the 0.5th percentile
    out = display_array(make_ds(arr))
    assert out.min() == 0.0 and out.max() == 1.0
    assert out[10, 10] == pytest.approx(1.0) and out[80, 80] == pytest.approx(0.0)


def test_percentile_window_of_a_large_image_is_estimated_from_a_subsample() -> None:
    """Beyond PERCENTILE_SAMPLE values the window comes from a regular subsample and stays within a grey level."""
    from inference import pixels

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:2400, :1800]
    arr = np.clip(800 + 1.2 * xx + 0.4 * yy + rng.normal(0, 60, xx.shape), 0, 4095).astype(np.uint16)
    assert arr.size > 4 * pixels.PERCENTILE_SAMPLE
    out = display_array(make_ds(arr))
    lo, hi = np.percentile(arr.astype(np.float64), (0.5, 99.5))
    exact = np.clip((arr - lo) / (hi - lo), 0, 1)
    assert np.abs(out - exact).max() < 1.0 / 255


def test_monochrome1_inverted_from_header() -> None:
    arr = ramp()
    mono2 = display_array(make_ds(arr, photometric="MONOCHROME2"))
    mono1 = display_array(make_ds(arr, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # The lowest stored value is white in MONOCHROME1, so it must come out bright.
    low = np.unravel_index(np.argmin(arr), arr.shape)
    assert mono1[low] == pytest.approx(1.0)


def test_monochrome1_inverted_with_window() -> None:
    arr = np.array([[0, 4095]], dtype=np.uint16)
    ds = make_ds(arr, photometric="MONOCHROME1")
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    out = display_array(ds)
    assert out[0, 0] > 0.99 and out[0, 1] < 0.01


def test_voi_lut_sequence_applied() -> None:
    arr = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = make_ds(arr)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = [100, 200, 300, 400]
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter = 0  # ignored: the LUT sequence wins
    ds.WindowWidth = 10
    np.testing.assert_allclose(display_array(ds), [[0, 1 / 3, 2 / 3, 1]], atol=1e-6)


def test_multiframe_all_and_single_frame() -> None:
    frames = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (10, 20, 30)])
    ds = make_ds(frames)
    assert number_of_frames(ds) == 3
    ds.RescaleSlope = 1
    ds.RescaleIntercept = 5
    allv = modality_values(ds)
    assert allv.shape == (3, 8, 8)
    assert modality_values(ds, frame=2)[0, 0] == 35.0
    assert display_array(ds, frame=1).shape == (8, 8)
    with pytest.raises(InvalidDatasetError):
        modality_values(ds, frame=3)


def test_enhanced_per_frame_rescale() -> None:
    frames = np.stack([np.full((4, 4), 100, dtype=np.uint16)] * 2)
    ds = make_ds(frames)
    groups = []
    for slope, intercept in ((1.0, -1024.0), (2.0, 0.0)):
        pvt = Dataset()
        pvt.RescaleSlope = slope
        pvt.RescaleIntercept = intercept
        pvt.RescaleType = "HU"
        fg = Dataset()
        fg.PixelValueTransformationSequence = Sequence([pvt])
        groups.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    assert modality_values(ds, frame=0)[0, 0] == -924.0
    assert modality_values(ds, frame=1)[0, 0] == 200.0
    both = modality_values(ds)
    assert both[0, 0, 0] == -924.0 and both[1, 0, 0] == 200.0


def test_missing_pixel_data_raises() -> None:
    ds = make_ds(ramp())
    del ds.PixelData
    with pytest.raises(InvalidDatasetError, match="no pixel data"):
        modality_values(ds)
    with pytest.raises(InvalidDatasetError):
        display_array(ds)


def test_signed_pixels() -> None:
    arr = np.array([[-1000, 0, 1000]], dtype=np.int16)
    ds = make_ds(arr, signed=True, bits=16)
    np.testing.assert_array_equal(modality_values(ds), arr.astype(np.float32))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_transfer_syntaxes(syntax: str) -> None:
    arr = ramp(64, 64)
    ds = make_ds(arr)
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -100
    try:
        ds.compress(syntax)
    except (RuntimeError, NotImplementedError) as exc:  # encoder plugin unavailable for this syntax
        pytest.skip(f"no encoder for {syntax}: {exc}")
    np.testing.assert_array_equal(modality_values(ds), arr.astype(np.float32) - 100)


def test_pixel_padding_excluded_from_percentiles_and_black() -> None:
    arr = np.full((100, 100), 3000, dtype=np.uint16)  # padding outside the field of view
    arr[20:80, 20:80] = 1000
    arr[20:50, 20:80] = 2000
    ds = make_ds(arr, photometric="MONOCHROME1")
    ds.PixelPaddingValue = 3000
    out = display_array(ds)
    assert out[0, 0] == 0.0  # padding is black even in MONOCHROME1
    # the range comes from the anatomy only: 2000 -> 0 (MONOCHROME1), 1000 -> 1
    assert out[30, 30] == pytest.approx(0.0) and out[60, 60] == pytest.approx(1.0)
