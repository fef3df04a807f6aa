"""CT pre-processing for ``spine_bmd``: HU, the bone window, a sagittal reformat and trabecular ROI HU.

* HU come from the Modality LUT (:func:`inference.pixels.modality_values`).
* The bone window is W=2000 / L=500 (the DSNet paper's "full bone window";
  :data:`BONE_WINDOW` is what bundles record).
* :func:`sagittal_reformat` resamples an axial stack (sorted by
  :func:`inference.series.load_series`) onto a sagittal plane with square pixels,
  using the slices' real positions, so irregular spacing and gaps are handled;
  its :class:`SagittalReformat` maps reformat rows back to axial slice indices.
* :func:`trabecular_roi` measures the mean HU of a central elliptical ROI inside
  a vertebral-body box (the QCT convention: the cortical shell and the
  basivertebral vein region at the box edges are excluded).

Array conventions: volumes are ``(slices, rows, cols)``; boxes are (x0, y0, x1, y1)
in pixel coordinates (x = column, y = row, pixel centres at integers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from scipy import ndimage

from inference.errors import InvalidDatasetError
from inference.pixels import apply_window, modality_values

log = logging.getLogger(__name__)

BONE_WINDOW_CENTER = 500.0
BONE_WINDOW_WIDTH = 2000.0
BONE_WINDOW: dict[str, float] = {"center": BONE_WINDOW_CENTER, "width": BONE_WINDOW_WIDTH}
BONE_HU = 200.0  # threshold used to find bone when locating the spine's midline


def hu(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Hounsfield units of one CT image (float32) from its Modality LUT.

    Raises
    ------
    InvalidDatasetError
        If the dataset has no pixel data or is not CT.
    """
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality != "CT":
        raise InvalidDatasetError(f"expected a CT image, got modality {modality!r}")
    if "RescaleIntercept" not in ds and "SharedFunctionalGroupsSequence" not in ds \
            and "PerFrameFunctionalGroupsSequence" not in ds:
        log.warning("CT image without Rescale Intercept: stored values are taken as HU")
    return modality_values(ds, frame)


def bone_window(values_hu: np.ndarray, center: float = BONE_WINDOW_CENTER,
                width: float = BONE_WINDOW_WIDTH) -> np.ndarray:
    """HU mapped through the bone window to [0, 1] (linear VOI function)."""
    return apply_window(values_hu, center, width)


# --------------------------------------------------------------------------- sagittal reformat


@dataclass(frozen=True)
class SagittalReformat:
    """A sagittal image made from an axial stack.

    Attributes
    ----------
    image:
        float32 (n_rows, axial_rows) in the input's units; row 0 is the most
        superior position (largest slice position), columns are the axial rows
        (anterior to posterior for a standard axial orientation).
    z_mm:
        Slice-position coordinate (mm along the stack normal) of each reformat row.
    column:
        Axial column index (or slab centre) the reformat was taken at.
    spacing:
        (row, column) pixel spacing of the reformat in mm (square by construction).
    positions:
        The input slice positions (mm), in stack order.
    """

    image: np.ndarray
    z_mm: np.ndarray
    column: int
    spacing: tuple[float, float]
    positions: np.ndarray

    def row_to_slice(self, row: float | np.ndarray) -> np.ndarray:
        """Fractional axial slice index (stack order) of a reformat row, by linear interpolation."""
        z = np.interp(np.asarray(row, dtype=float), np.arange(len(self.z_mm)), self.z_mm)
        order = np.argsort(self.positions)
        return np.interp(z, self.positions[order], np.arange(len(self.positions), dtype=float)[order])

    def slice_to_row(self, index: float | np.ndarray) -> np.ndarray:
        """Reformat row (fractional) of an axial slice index."""
        z = np.interp(np.asarray(index, dtype=float), np.arange(len(self.positions)), self.positions)
        return (self.z_mm[0] - z) / self.spacing[0]


def spine_midline_column(volume_hu: np.ndarray, *, threshold: float = BONE_HU, central_fraction: float = 0.5) -> int:
    """Axial column with the most bone voxels within the central part of the image (the spine's midline).

    The count per column is smoothed over 5 % of the width; only the central
    ``central_fraction`` of the columns is searched, which excludes the pelvis
    and ribs at the sides.
    """
    if volume_hu.ndim != 3:
        raise ValueError(f"volume must be (slices, rows, cols), got shape {volume_hu.shape}")
    cols = volume_hu.shape[2]
    counts = (volume_hu > threshold).sum(axis=(0, 1)).astype(float)
    counts = ndimage.uniform_filter1d(counts, size=max(1, int(cols * 0.05)))
    lo = int(cols * (1 - central_fraction) / 2)
    hi = max(lo + 1, int(cols * (1 + central_fraction) / 2))
    return lo + int(np.argmax(counts[lo:hi]))


def sagittal_reformat(
    volume: np.ndarray,
    positions: Sequence[float] | np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    column: int | None = None,
    slab: int = 1,
    out_spacing: float | None = None,
) -> SagittalReformat:
    """Sagittal reformat of an axial stack at ``column`` (default: :func:`spine_midline_column`).

    Parameters
    ----------
    volume:
        (slices, rows, cols) values (HU or windowed), slices in any order.
    positions:
        Each slice's position along the stack normal in mm (e.g. the dot product
        of ImagePositionPatient with the normal); need not be uniform.
    pixel_spacing:
        Axial (row, column) spacing in mm.
    slab:
        Number of columns averaged around ``column`` (a thin slab smooths noise).
    out_spacing:
        Spacing of the output in mm along both axes (default: the axial row spacing).
    """
    vol = np.asarray(volume, dtype=np.float32)
    pos = np.asarray(positions, dtype=float)
    if vol.ndim != 3 or len(pos) != vol.shape[0]:
        raise ValueError(f"need a (slices, rows, cols) volume and one position per slice, got {vol.shape}, {len(pos)}")
    if len(pos) < 2 or np.ptp(pos) <= 0:
        raise InvalidDatasetError("a sagittal reformat needs at least two slices at distinct positions")
    col = spine_midline_column(vol) if column is None else int(column)
    if not 0 <= col < vol.shape[2]:
        raise ValueError(f"column {col} outside 0..{vol.shape[2] - 1}")
    half = max(0, slab // 2)
    c0, c1 = max(0, col - half), min(vol.shape[2], col + half + 1)
    plane = vol[:, :, c0:c1].mean(axis=2)  # (slices, rows)
    order = np.argsort(-pos)  # superior (largest position) first
    pos_sorted = pos[order]
    plane = plane[order]
    row_sp = float(pixel_spacing[0])
    step = float(out_spacing) if out_spacing else row_sp
    n_out = int(np.floor((pos_sorted[0] - pos_sorted[-1]) / step)) + 1
    z = pos_sorted[0] - step * np.arange(n_out)
    # Linear interpolation between the two nearest slices along z (positions descending).
    idx = np.interp(-z, -pos_sorted, np.arange(len(pos_sorted), dtype=float))
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, len(pos_sorted) - 1)
    w = (idx - lo)[:, None].astype(np.float32)
    image = (1 - w) * plane[lo] + w * plane[hi]
    if abs(step - row_sp) > 1e-6:  # resample the anterior-posterior axis to the output spacing too
        n_ap = max(1, int(round(plane.shape[1] * row_sp / step)))
        image = ndimage.zoom(image, (1.0, n_ap / plane.shape[1]), order=1, grid_mode=True, mode="nearest")
    return SagittalReformat(image.astype(np.float32), z, col, (step, step), pos)


# --------------------------------------------------------------------------- slices and ROI


def mid_slice_indices(positions: Sequence[float] | np.ndarray, z0: float, z1: float, count: int = 3) -> list[int]:
    """Indices of the ``count`` slices nearest the middle of [z0, z1] (mm) that lie inside it.

    Used to pick each vertebra's mid-body slices from its extent on the
    sagittal reformat. Returns fewer indices when fewer slices lie inside, and
    the single nearest slice when none do. Sorted by index.
    """
    pos = np.asarray(positions, dtype=float)
    lo, hi = min(z0, z1), max(z0, z1)
    mid = (lo + hi) / 2.0
    inside = np.nonzero((pos >= lo) & (pos <= hi))[0]
    if inside.size == 0:
        return [int(np.argmin(np.abs(pos - mid)))]
    best = inside[np.argsort(np.abs(pos[inside] - mid), kind="stable")[:count]]
    return sorted(int(i) for i in best)


@dataclass(frozen=True)
class RoiStats:
    """Statistics of a trabecular ROI: mean and standard deviation (HU), voxel count, and the ROI's box."""

    mean_hu: float
    std_hu: float
    n_voxels: int
    box: tuple[float, float, float, float]


def trabecular_roi(
    values_hu: np.ndarray,
    box: tuple[float, float, float, float],
    *,
    fraction: float = 0.5,
    hu_range: tuple[float, float] = (-200.0, 1000.0),
) -> RoiStats:
    """Mean HU in a central elliptical ROI inside a vertebral-body box.

    The ellipse is centred on the box with semi-axes ``fraction`` / 2 of the
    box's width and height (0.5 keeps the central half, clear of the cortical
    shell). Voxels outside ``hu_range`` (air from a wrong box, metal, dense
    calcification) are left out. ``values_hu`` is one slice (rows, cols) or
    several (slices, rows, cols) sharing the box.

    Raises
    ------
    ValueError
        If the ROI holds no usable voxel.
    """
    arr = np.asarray(values_hu, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"values must be 2-D or 3-D, got shape {arr.shape}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    ax, ay = max((x1 - x0) * fraction / 2.0, 0.5), max((y1 - y0) * fraction / 2.0, 0.5)
    rows, cols = arr.shape[1:]
    yy, xx = np.mgrid[0:rows, 0:cols]
    ellipse = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
    voxels = arr[:, ellipse]
    voxels = voxels[(voxels >= hu_range[0]) & (voxels <= hu_range[1])]
    if voxels.size == 0:
        raise ValueError(f"trabecular ROI inside box {box} holds no voxel within {hu_range} HU")
    return RoiStats(float(voxels.mean()), float(voxels.std()), int(voxels.size), (cx - ax, cy - ay, cx + ax, cy + ay))
