"""The VOI stage of inference.pixels (pydicom's apply_windowing / apply_voi) gives the pixels of the numpy code
it replaced, on synthetic images with LINEAR, LINEAR_EXACT and SIGMOID windows and VOI LUT Sequences."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.pixels import apply_windowing
from pydicom.sequence import Sequence

from inference.pixels import apply_window, display_array, modality_values
from tests.unit.test_pixels import make_ds


def _ref_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The numpy windowing inference/pixels.py had before pydicom."""
    v = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        v = np.clip(v, center - 20 * width, center + 20 * width)  # same result, no overflow warning
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    elif function == "LINEAR_EXACT":
        out = (v - (center - width / 2.0)) / width
    else:
        out = (v - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (v > center - 0.5).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _ref_lut(values: np.ndarray, data: list[int], first: int) -> np.ndarray:
    """The numpy VOI LUT Sequence code inference/pixels.py had before pydicom."""
    table = np.asarray(data, dtype=np.float32)
    out = table[np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.int64)]
    return np.clip((out - table.min()) / (table.max() - table.min()), 0.0, 1.0).astype(np.float32)


def _image(seed: int, signed: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    arr = rng.integers(-2048 if signed else 0, 4096, (40, 56))
    arr[:4] = np.arange(56) * 73 % 4096  # a ramp across the whole range
    return arr


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40.0, 80.0), (2048.0, 4096.0), (300.5, 1.0), (1000.0, 2.5)])
def test_window_functions_give_the_previous_pixels(function: str, center: float, width: float) -> None:
    arr = _image(int(center))
    ds = make_ds(arr)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, function
    expected = _ref_window(arr.astype(np.float32) - 1024, center, width, function)
    np.testing.assert_allclose(display_array(ds), expected, rtol=0, atol=1e-6)
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(display_array(ds), 1.0 - expected, rtol=0, atol=1e-6)


def test_apply_window_on_float_hu_and_bad_widths() -> None:
    hu = np.linspace(-1500, 2500, 4001, dtype=np.float32).reshape(4001)
    for fn in ("LINEAR", "LINEAR_EXACT", "SIGMOID", "bogus"):
        ref_fn = "LINEAR" if fn == "bogus" else fn
        np.testing.assert_allclose(apply_window(hu, 400, 1800, fn), _ref_window(hu, 400, 1800, ref_fn), atol=1e-6)
    with pytest.raises(ValueError, match=">= 1 for LINEAR"):
        apply_window(hu, 40, 0.5)
    with pytest.raises(ValueError, match="> 0 for SIGMOID"):
        apply_window(hu, 40, 0, "SIGMOID")


def _lut_item(data: list[int], first: int, bits: int = 16, ow: bool = False) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first % 2**16, bits]
    if ow:
        item.add_new("LUTData", "OW", np.asarray(data, dtype="<u2").tobytes())
    else:
        item.LUTData = data
    return item


@pytest.mark.parametrize("ow", [False, True])
@pytest.mark.parametrize(("signed", "first"), [(False, 0), (False, 500), (True, -1000)])
def test_voi_lut_sequence_gives_the_previous_pixels(ow: bool, signed: bool, first: int) -> None:
    arr = _image(7, signed)
    data = [int(v) for v in (np.sqrt(np.arange(3000)) * 40).astype(int) + 100]
    ds = make_ds(arr, signed=signed, bits=13 if signed else 12)
    ds.VOILUTSequence = Sequence([_lut_item(data, first, ow=ow)])
    ds.WindowCenter, ds.WindowWidth = 10, 20  # the LUT Sequence wins over the window
    np.testing.assert_array_equal(display_array(ds), _ref_lut(arr.astype(np.float32), data, first))


def test_voi_lut_after_fractional_rescale_rounds_to_nearest_entry() -> None:
    arr = _image(3)
    ds = make_ds(arr)
    ds.RescaleSlope, ds.RescaleIntercept = 0.7, 0.2
    data = list(range(0, 8192, 2))
    ds.VOILUTSequence = Sequence([_lut_item(data, 0)])
    values = modality_values(ds)
    assert np.any(np.abs(values - np.rint(values)) > 0.2)
    np.testing.assert_array_equal(display_array(ds), _ref_lut(values, data, 0))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize(("center", "width"), [(40.0, 80.0), (300.5, 1.0), (1000.0, 2.5), (-200.0, 3000.0)])
def test_apply_window_equals_pydicom_apply_windowing(function: str, center: float, width: float) -> None:
    """The float32 fast path is pydicom's windowing (output range [0, 1]: 1-bit unsigned, no rescale)."""
    hu = np.linspace(-2000, 3000, 20001, dtype=np.float32)
    voi = Dataset()
    voi.PhotometricInterpretation, voi.BitsStored, voi.PixelRepresentation = "MONOCHROME2", 1, 0
    voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = center, width, function
    with np.errstate(over="ignore"):
        expected = apply_windowing(hu, voi)
    np.testing.assert_allclose(apply_window(hu, center, width, function), expected, rtol=0, atol=1e-6)
