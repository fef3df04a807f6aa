"""The DICOM pixel pipeline shared by every task, by training and by the result writers.

Stages, in DICOM order (PS3.3 C.11 and C.7.6.16.2):

1. decode the stored values (pydicom; compressed transfer syntaxes via pylibjpeg),
2. Modality LUT: Rescale Slope/Intercept or a Modality LUT Sequence, giving
   *modality values* (HU for CT, density units for calibrated scanners)
   -> :func:`modality_values`,
3. VOI LUT: a VOI LUT Sequence, else Window Center/Width, else the 0.5-99.5
   percentile range of the image -> :func:`display_array`,
4. presentation: MONOCHROME1 is inverted from the header so that the output of
   :func:`display_array` always means "high = bright = dense".

Frames are 0-based here (``frame=0`` is the first frame); the result model's
:class:`~inference.findings.ImageRef` uses 1-based frame numbers, as DICOM does.
Per-frame functional groups of enhanced multi-frame objects (Pixel Value
Transformation and Frame VOI LUT) are honoured.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi
from pydicom.pixels import pixel_array as _decode

from inference.errors import InvalidDatasetError

log = logging.getLogger(__name__)

__all__ = [
    "apply_window",
    "display_array",
    "is_monochrome1",
    "modality_values",
    "number_of_frames",
    "voi_window",
]

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def number_of_frames(ds: Dataset) -> int:
    """Number of frames in ``ds`` (1 when Number of Frames is absent or empty)."""
    value = ds.get("NumberOfFrames", 1)
    try:
        return max(1, int(value or 1))
    except (TypeError, ValueError) as exc:
        raise InvalidDatasetError(f"invalid Number of Frames {value!r}") from exc


def is_monochrome1(ds: Dataset) -> bool:
    """True when the header says MONOCHROME1 (minimum value displayed white)."""
    return str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"


def _check_frame(ds: Dataset, frame: int | None) -> None:
    if frame is None:
        return
    n = number_of_frames(ds)
    if not 0 <= int(frame) < n:
        raise InvalidDatasetError(f"frame index {frame} out of range for a dataset with {n} frame(s)")


def _functional_group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """First item of ``sequence`` in the per-frame, else the shared, functional groups."""
    for groups_kw, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_kw)
        if groups is None or len(groups) <= idx:
            continue
        seq = groups[idx].get(sequence)
        if seq is not None and len(seq) > 0:
            return seq[0]
    return None


def _decode_pixels(ds: Dataset, frame: int | None) -> np.ndarray:
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        raise InvalidDatasetError("dataset has no pixel data (no Pixel Data, Float or Double Float Pixel Data)")
    _check_frame(ds, frame)
    try:
        arr = _decode(ds, index=frame) if frame is not None else ds.pixel_array
    except InvalidDatasetError:
        raise
    except Exception as exc:  # decoders raise many types; one clear error for callers
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InvalidDatasetError(f"cannot decode pixel data (transfer syntax {syntax}): {exc}") from exc
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        # Colour (secondary captures, photos): reduce to luminance (ITU-R BT.601).
        arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif samples != 1:
        raise InvalidDatasetError(f"unsupported Samples per Pixel {samples}")
    return arr


def _rescale(arr: np.ndarray, ds: Dataset, frame: int | None) -> np.ndarray:
    """Apply the Modality LUT to stored values of one frame (or all frames)."""
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if enhanced and "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        frames = [frame] if frame is not None else list(range(number_of_frames(ds)))
        stack = arr.reshape((len(frames), *arr.shape[-2:]))
        out = np.empty(stack.shape, dtype=np.float32)
        for i, f in enumerate(frames):
            item = _functional_group_item(ds, f, "PixelValueTransformationSequence")
            slope = float(item.get("RescaleSlope", 1.0)) if item is not None else 1.0
            intercept = float(item.get("RescaleIntercept", 0.0)) if item is not None else 0.0
            out[i] = stack[i].astype(np.float32) * np.float32(slope) + np.float32(intercept)
        return out.reshape(arr.shape)
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds:
        try:
            return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
        except Exception as exc:
            raise InvalidDatasetError(f"invalid Modality LUT / rescale attributes: {exc}") from exc
    return arr.astype(np.float32, copy=False)


def modality_values(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Decoded pixel data after the Modality LUT, as float32.

    Parameters
    ----------
    ds:
        A dataset with pixel data.
    frame:
        0-based frame index, or None for everything: shape (rows, cols) for a
        single-frame image, (frames, rows, cols) for a multi-frame one.

    Returns
    -------
    numpy.ndarray
        float32 modality values (e.g. HU for CT).

    Raises
    ------
    InvalidDatasetError
        Without pixel data, with undecodable pixel data, or a bad frame index.
    """
    arr = _decode_pixels(ds, frame)
    return _rescale(arr, ds, frame)


def _first_float(value: object) -> float:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def voi_window(ds: Dataset, frame: int | None = None) -> tuple[float, float] | None:
    """The first (Window Center, Window Width) pair in the header, or None.

    Looks at the top-level attributes, then at the Frame VOI LUT functional
    group of ``frame`` (0 if None). A width below 1 is invalid (PS3.3 C.11.2.1.2)
    and yields None.
    """
    source: Dataset | None = ds if "WindowCenter" in ds and "WindowWidth" in ds else None
    if source is None:
        source = _functional_group_item(ds, frame or 0, "FrameVOILUTSequence")
        if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
            return None
    try:
        center = _first_float(source.WindowCenter)
        width = _first_float(source.WindowWidth)
    except (TypeError, ValueError, IndexError):
        log.warning("ignoring unparsable Window Center/Width")
        return None
    if not np.isfinite(center) or not np.isfinite(width) or width < 1.0:
        log.warning("ignoring invalid window (width %s)", width)
        return None
    return center, width


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map modality values through a VOI window to [0, 1] (float32).

    Implements the LINEAR, LINEAR_EXACT and SIGMOID VOI LUT functions of PS3.3 C.11.2.1.2 with an output range
    of [0, 1]; an unknown function is treated as LINEAR. This is the formula of
    :func:`pydicom.pixels.apply_windowing` (tests/unit/test_pixels_voi_pydicom.py checks the two agree to 1e-6)
    in float32 without boolean masks: pydicom's float64 version took 4-6x as long on a radiograph and a CT volume
    (benchmarks/voi_lut.py, benchmarks/README.md "VOI LUT"), a quarter of a second per radiograph.
    """
    v = np.asarray(values, dtype=np.float32)
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for SIGMOID, got {width}")
        with np.errstate(over="ignore"):  # far below the window exp overflows to inf: output 0, as it should
            out = 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"window width must be > 0 for LINEAR_EXACT, got {width}")
        out = (v - (center - width / 2.0)) / width
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR, got {width}")
        out = (v - (center - 0.5)) / (width - 1.0) + 0.5 if width > 1 else (v > center - 0.5).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


#: most values the percentile window is estimated from (a regular subsample beyond that)
PERCENTILE_SAMPLE = 1_000_000


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels whose stored value is Pixel Padding Value (up to Pixel Padding Range Limit), or None."""
    if "PixelPaddingValue" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    try:
        a = int(ds.PixelPaddingValue)
        b = int(ds.get("PixelPaddingRangeLimit", a))
    except (TypeError, ValueError):
        log.warning("ignoring unparsable Pixel Padding Value")
        return None
    lo, hi = min(a, b), max(a, b)
    return (stored >= lo) & (stored <= hi)


def _percentile_scale(values: np.ndarray, percentiles: tuple[float, float],
                      exclude: np.ndarray | None = None) -> np.ndarray:
    keep = np.isfinite(values) if exclude is None else np.isfinite(values) & ~exclude
    finite = values[keep]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    # a regular subsample of at most ~1M values estimates the percentiles to well under one grey level of
    # the output and saves most of the time on full-size radiographs (5M+ pixels)
    lo, hi = np.percentile(finite[:: max(1, finite.size // PERCENTILE_SAMPLE)], percentiles)
    if hi <= lo:  # constant image (or nearly): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _voi_lut_dataset(ds: Dataset) -> Dataset:
    """The first VOI LUT Sequence item of ``ds`` as a VOI LUT Module for :func:`pydicom.pixels.apply_voi`.

    The first mapped value is made signed for signed pixel data (the descriptor's VR is US or SS, PS3.3
    C.11.2.1.1), and OW LUT Data is read in the byte order of ``ds`` (little endian when unknown).
    """
    item = ds.VOILUTSequence[0]
    descriptor = [int(v) for v in item.LUTDescriptor]
    if descriptor[1] >= 2**15 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        descriptor[1] -= 2**16
    lut = Dataset()
    lut.add_new("LUTDescriptor", "SS" if descriptor[1] < 0 else "US", descriptor)
    lut.add_new("LUTData", item["LUTData"].VR, item.LUTData)
    voi = Dataset()
    voi.VOILUTSequence = [lut]
    little, implicit = getattr(ds, "original_encoding", (None, None))
    voi.set_original_encoding(bool(implicit), True if little is None else bool(little))
    return voi


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first VOI LUT Sequence item and scale its output to [0, 1].

    Inputs below the first mapped value take the first entry, inputs above the last take the last (PS3.3
    C.11.2.1.1); non-integer modality values are rounded to the nearest entry. The output is scaled by the LUT's
    own range, since descriptors often claim 16 bits for 12-bit data. pydicom's :func:`~pydicom.pixels.apply_voi`
    decodes the table (descriptor, US or OW data, byte order); the per-pixel lookup is one numpy indexing on
    float32, 3x as fast as ``apply_voi`` over the whole image (benchmarks/voi_lut.py).
    """
    voi = _voi_lut_dataset(ds)
    descriptor = voi.VOILUTSequence[0].LUTDescriptor
    n, first = int(descriptor[0]) or 2**16, int(descriptor[1])
    data = apply_voi(np.arange(first, first + n, dtype=np.int64), voi).astype(np.float32)
    if data.size == 0:
        raise ValueError("empty LUT Data")
    out = data[np.clip(np.rint(values) - first, 0, data.size - 1).astype(np.int64)]
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def display_array(
    ds: Dataset,
    frame: int | None = None,
    *,
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """Pixel data as displayed, float32 in [0, 1] where high means bright (dense).

    The VOI LUT Sequence is used if present, else Window Center/Width, else the
    ``percentiles`` range of the modality values (computed over all frames
    returned, padding excluded). MONOCHROME1 images are inverted from the
    header, so callers never need to look at Photometric Interpretation. Pixels
    marked by Pixel Padding Value (/Range Limit) come out 0 (black).

    Parameters
    ----------
    ds:
        A greyscale (or colour, reduced to luminance) dataset with pixel data.
    frame:
        0-based frame index, or None for all frames (see :func:`modality_values`).
    percentiles:
        Lower and upper percentile used when the header has no VOI.
    """
    stored = _decode_pixels(ds, frame)
    values = _rescale(stored, ds, frame)
    padding = _padding_mask(stored, ds)
    out: np.ndarray | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        try:
            out = _voi_lut_sequence(values, ds)
        except Exception as exc:  # malformed LUT: fall through to window/percentiles
            log.warning("ignoring unusable VOI LUT Sequence: %s", exc)
    if out is None:
        window = voi_window(ds, frame)
        if window is not None:
            out = apply_window(values, window[0], window[1], str(ds.get("VOILUTFunction", "LINEAR")))
    if out is None:
        out = _percentile_scale(values, percentiles, padding)
    if is_monochrome1(ds):
        out = 1.0 - out
    if padding is not None:
        out = np.where(padding, 0.0, out)
    return np.nan_to_num(out, nan=0.0).astype(np.float32, copy=False)
