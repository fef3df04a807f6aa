"""Knee MR pre-processing for ``knee_bone_seg``: N4, a square crop at the joint, 224x224, z-score, exact inverse.

Steps (knee thesis section 3.3, with the task spec's changes):

1. :func:`n4_correct` - N4 bias field correction (SimpleITK) fitted on a copy
   shrunk by 4 in-plane (1 through-plane for stacks under 48 slices, else 2)
   inside an Otsu mask; the log bias field is then evaluated on the full grid
   and divided out. Seconds instead of the thesis's 60-120 s.
2. :func:`joint_centre` - where femur and tibia meet. Two ways:
   * intensity profile (default): on the mean of the central third of the
     slices, the row profile of a central band (half the median row width of
     the Otsu-bright region, around its centroid column) is smoothed, and its minimum in the
     central half of the rows is the joint line: marrow fat is bright on the
     T1/PD-weighted knee protocols this task targets, the joint space
     (cartilage, menisci, fluid) is darker. Rows are assumed to run
     superior-inferior (coronal and sagittal acquisitions);
   * a coarse first pass: :func:`joint_centre_from_masks` takes femur and tibia
     masks (e.g. a low-resolution network pass) and returns the midpoint between
     the femur's lowest and the tibia's highest row.
3. :class:`CropResize` - a square window of ``crop_mm`` (clamped to the image,
   shifted to stay inside it, never padded) around the centre, resized
   in-plane to 224x224; slices stay native (no interpolation across slices).
4. :class:`ZScore` - population mean/std from the bundle.

**Exact inverse (the guarantee).** Along each in-plane axis a window of ``S``
source pixels is split into 224 equal cells; source pixel ``i`` belongs to cell
``floor((i + 0.5) * 224 / S)`` (the cell containing its centre).
:meth:`CropResize.mask_to_source` gives every source pixel the value of its cell
(nearest neighbour) and 0 outside the window, on exactly the source grid
(same rows, columns and slices). :meth:`CropResize.mask_to_model` is its
partner: the majority of a cell's source pixels when ``S >= 224``, the source
pixel containing the cell centre when ``S < 224``. Hence:

* ``mask_to_model(mask_to_source(m)) == m`` for every 224x224 mask when ``S >= 224``;
* ``mask_to_source(mask_to_model(m)) == m`` for every source mask that is zero
  outside the window when ``S <= 224``, and, for ``S > 224``, for every source
  mask that is constant on cells;
* at ``S == 224`` the two are inverse bijections.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from inference.radiograph_parts import otsu_threshold

log = logging.getLogger(__name__)

MODEL_SIZE = 224
N4_SHRINK = 4
DEFAULT_CROP_MM = 140.0


# --------------------------------------------------------------------------- N4


def n4_correct(
    volume: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    *,
    shrink: int = N4_SHRINK,
    iterations: tuple[int, ...] = (50, 50, 30),
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias field correction of a (slices, rows, cols) volume.

    Parameters
    ----------
    volume:
        Non-negative MR intensities.
    spacing:
        (slice, row, column) spacing in mm (the B-spline grid is physical).
    shrink:
        In-plane shrink factor for fitting the field (through-plane: 1 below 48
        slices, else 2).
    iterations:
        Maximum iterations per fitting level (one level per entry).
    mask:
        Optional foreground mask (full resolution); default Otsu on the shrunk image.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        The corrected volume and the multiplicative bias field (float32, same shape).
    """
    import SimpleITK as sitk

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"expected a (slices, rows, cols) volume, got shape {vol.shape}")
    floor = max(float(vol.max()) * 1e-4, 1e-6)
    img = sitk.GetImageFromArray(np.maximum(vol, floor))
    img.SetSpacing((float(spacing[2]), float(spacing[1]), float(spacing[0])))
    z_shrink = 1 if vol.shape[0] < 48 else 2
    factors = [max(1, min(shrink, vol.shape[2] // 8)), max(1, min(shrink, vol.shape[1] // 8)), z_shrink]
    small = sitk.Shrink(img, factors)
    if mask is None:
        small_mask = sitk.OtsuThreshold(small, 0, 1, 200)
    else:
        m = sitk.GetImageFromArray(np.asarray(mask, dtype=np.uint8))
        m.CopyInformation(img)
        small_mask = sitk.Cast(sitk.Shrink(m, factors) > 0, sitk.sitkUInt8)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(img)
    bias = np.exp(sitk.GetArrayFromImage(log_bias)).astype(np.float32)
    return (vol / bias).astype(np.float32), bias


# --------------------------------------------------------------------------- joint centre


def joint_centre(volume: np.ndarray) -> tuple[float, float]:
    """(row, col) where femur and tibia meet, from the intensity profile (see module doc)."""
    vol = np.asarray(volume, dtype=np.float32)
    n, rows, cols = vol.shape
    mean = vol[n // 3: max(n // 3 + 1, 2 * n // 3)].mean(axis=0)
    fg = mean > otsu_threshold(mean)
    if fg.sum() < 10:
        return (rows - 1) / 2.0, (cols - 1) / 2.0
    fg_rows = np.nonzero(fg.any(axis=1))[0]
    col_c = float(np.nonzero(fg)[1].mean())
    widths = fg.sum(axis=1)
    half = max(2.0, float(np.median(widths[fg_rows])) / 4.0)
    c0, c1 = int(max(0, col_c - half)), int(min(cols, col_c + half + 1))
    profile = mean[:, c0:c1].mean(axis=1)
    profile = ndimage.gaussian_filter1d(profile, sigma=max(1.0, rows * 0.015), mode="nearest")
    lo, hi = rows // 4, max(rows // 4 + 1, 3 * rows // 4)
    row_c = float(lo + int(np.argmin(profile[lo:hi])))
    return row_c, col_c


def joint_centre_from_masks(femur: np.ndarray, tibia: np.ndarray) -> tuple[float, float]:
    """(row, col) midway between the femur's lowest and the tibia's highest row (coarse first pass).

    Masks are (slices, rows, cols) or (rows, cols) in the same grid; rows run
    superior (0) to inferior. The column is the mean of both bones' centroid columns.

    Raises
    ------
    ValueError
        If either mask is empty.
    """
    f = np.asarray(femur, dtype=bool)
    t = np.asarray(tibia, dtype=bool)
    f2 = f.any(axis=0) if f.ndim == 3 else f
    t2 = t.any(axis=0) if t.ndim == 3 else t
    if not f2.any() or not t2.any():
        raise ValueError("femur and tibia masks must both be non-empty")
    f_rows, f_cols = np.nonzero(f2)
    t_rows, t_cols = np.nonzero(t2)
    row = (float(f_rows.max()) + float(t_rows.min())) / 2.0
    col = (float(f_cols.mean()) + float(t_cols.mean())) / 2.0
    return row, col


# --------------------------------------------------------------------------- crop + resize


def _cells(size: int, out: int) -> np.ndarray:
    """Cell index of each of ``size`` source pixels: the cell containing its centre."""
    return np.minimum((np.arange(size) + 0.5) * out // size, out - 1).astype(np.int64)


def _cell_sources(size: int, out: int) -> np.ndarray:
    """Source pixel containing each of ``out`` cell centres."""
    return np.minimum(((np.arange(out) + 0.5) * size / out).astype(np.int64), size - 1)


@dataclass(frozen=True)
class CropResize:
    """An in-plane window of the source grid and its resize to ``out`` x ``out``.

    ``r0, c0`` is the window's top-left source pixel and ``size_r, size_c`` its
    size in source pixels (square in mm); ``source_shape`` is (rows, cols).
    """

    r0: int
    c0: int
    size_r: int
    size_c: int
    source_shape: tuple[int, int]
    out: int = MODEL_SIZE

    @classmethod
    def around(cls, centre: tuple[float, float], source_shape: tuple[int, int], pixel_spacing: tuple[float, float],
               *, crop_mm: float = DEFAULT_CROP_MM, out: int = MODEL_SIZE) -> CropResize:
        """A ``crop_mm`` square centred on ``centre`` (row, col), shrunk to fit and shifted inside the image."""
        rows, cols = source_shape
        scale = min(1.0, rows * pixel_spacing[0] / crop_mm, cols * pixel_spacing[1] / crop_mm)
        side_mm = crop_mm * scale  # largest square (in mm) up to crop_mm that fits the image
        size_r = int(min(rows, max(1, round(side_mm / pixel_spacing[0]))))
        size_c = int(min(cols, max(1, round(side_mm / pixel_spacing[1]))))
        r0 = int(np.clip(round(centre[0] - size_r / 2.0 + 0.5), 0, rows - size_r))
        c0 = int(np.clip(round(centre[1] - size_c / 2.0 + 0.5), 0, cols - size_c))
        return cls(r0, c0, size_r, size_c, (int(rows), int(cols)), out)

    def to_dict(self) -> dict[str, object]:
        """Plain dict (for job artefacts and logs)."""
        d = asdict(self)
        d["source_shape"] = list(self.source_shape)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CropResize:
        """Inverse of :meth:`to_dict`."""
        shape = data["source_shape"]
        return cls(int(data["r0"]), int(data["c0"]), int(data["size_r"]), int(data["size_c"]),  # type: ignore[arg-type]
                   (int(shape[0]), int(shape[1])), int(data.get("out", MODEL_SIZE)))  # type: ignore[index,arg-type]

    def _window(self, volume: np.ndarray) -> np.ndarray:
        arr = np.asarray(volume)
        if arr.shape[-2:] != self.source_shape:
            raise ValueError(f"expected in-plane shape {self.source_shape}, got {arr.shape[-2:]}")
        return arr[..., self.r0: self.r0 + self.size_r, self.c0: self.c0 + self.size_c]

    def image_to_model(self, volume: np.ndarray) -> np.ndarray:
        """Crop and resize intensities, (slices, rows, cols) -> (slices, out, out) float32.

        Bilinear with pixel edges aligned (the same geometry as the cells), with
        Gaussian anti-aliasing in-plane when shrinking; slices untouched.
        """
        win = self._window(volume).astype(np.float32)
        squeeze = win.ndim == 2
        if squeeze:
            win = win[None]
        fr, fc = self.out / self.size_r, self.out / self.size_c
        sig = (0.0, max(0.0, (1 / fr - 1) / 2), max(0.0, (1 / fc - 1) / 2))
        if sig[1] > 0 or sig[2] > 0:
            win = ndimage.gaussian_filter(win, sigma=sig, mode="nearest")
        res = ndimage.zoom(win, (1.0, fr, fc), order=1, grid_mode=True, mode="nearest")
        res = res[:, : self.out, : self.out]
        if res.shape[1:] != (self.out, self.out):
            res = np.pad(res, ((0, 0), (0, self.out - res.shape[1]), (0, self.out - res.shape[2])), mode="edge")
        return (res[0] if squeeze else res).astype(np.float32)

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """Source-grid mask -> model grid (majority per cell, or the pixel under the cell centre when upsampling)."""
        win = self._window(mask).astype(np.float32)
        for axis, size in ((-2, self.size_r), (-1, self.size_c)):
            if size >= self.out:
                cells = _cells(size, self.out)
                starts = np.searchsorted(cells, np.arange(self.out))
                counts = np.diff(np.append(starts, size))
                win = np.add.reduceat(win, starts, axis=axis) / counts.reshape((-1, 1) if axis == -2 else (1, -1))
            else:
                win = np.take(win, _cell_sources(size, self.out), axis=axis)
        return win >= 0.5

    def mask_to_source(self, mask: np.ndarray) -> np.ndarray:
        """Model-grid mask (..., out, out) -> boolean mask on the full source grid (nearest cell, 0 outside)."""
        m = np.asarray(mask)
        if m.shape[-2:] != (self.out, self.out):
            raise ValueError(f"expected a (..., {self.out}, {self.out}) mask, got {m.shape}")
        full = np.zeros((*m.shape[:-2], *self.source_shape), dtype=bool)
        win = np.take(np.take(m.astype(bool), _cells(self.size_r, self.out), axis=-2),
                      _cells(self.size_c, self.out), axis=-1)
        full[..., self.r0: self.r0 + self.size_r, self.c0: self.c0 + self.size_c] = win
        return full

    def probabilities_to_source(self, probs: np.ndarray) -> np.ndarray:
        """Model-grid maps (..., out, out) -> source grid by bilinear interpolation (0 outside the window).

        Thresholding this gives smoother boundaries than :meth:`mask_to_source`
        when the window is larger than 224 pixels; it has no exactness guarantee.
        """
        p = np.asarray(probs, dtype=np.float32)
        lead = p.shape[:-2]
        flat = p.reshape((-1, self.out, self.out))
        zoomed = ndimage.zoom(flat, (1.0, self.size_r / self.out, self.size_c / self.out), order=1,
                              grid_mode=True, mode="nearest")[:, : self.size_r, : self.size_c]
        full = np.zeros((flat.shape[0], *self.source_shape), dtype=np.float32)
        full[:, self.r0: self.r0 + zoomed.shape[1], self.c0: self.c0 + zoomed.shape[2]] = zoomed
        return full.reshape((*lead, *self.source_shape))


# --------------------------------------------------------------------------- normalisation + pipeline


@dataclass(frozen=True)
class ZScore:
    """Population z-score constants stored in the bundle."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """(values - mean) / std as float32."""
        return ((np.asarray(values, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, float]:
        """Plain dict for bundle.json."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> ZScore:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["mean"]), float(data["std"]))

    @classmethod
    def fit(cls, volumes: Iterable[np.ndarray]) -> ZScore:
        """Mean and std over every voxel of the (pre-processed, un-normalised) training volumes."""
        total = total_sq = 0.0
        count = 0
        for v in volumes:
            a = np.asarray(v, dtype=np.float64)
            total += float(a.sum())
            total_sq += float((a * a).sum())
            count += a.size
        if count == 0:
            raise ValueError("cannot fit a z-score on no data")
        mean = total / count
        return cls(mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0))) or 1.0)


@dataclass
class PreparedMR:
    """A knee volume ready for the 2D U-Net, with what is needed to map predictions back.

    ``array`` is (slices, out, out) float32, z-scored when a :class:`ZScore` was
    given; slice ``k`` is source slice ``k``.
    """

    array: np.ndarray
    crop: CropResize
    centre: tuple[float, float]
    bias_field: np.ndarray | None = None
