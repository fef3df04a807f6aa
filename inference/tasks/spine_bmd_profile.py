"""Profile pass of ``spine_bmd`` level finding (steps 1-3 of :mod:`inference.tasks.spine_bmd_levels`).

The vertebral bone of each slice (:func:`vertebra_mask`), the spine's midline column, the anterior
cortex row per slice and the cortical-bone profile behind it (:func:`spine_geometry`); the body runs and
level names built on that profile stay in :mod:`inference.tasks.spine_bmd_levels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from inference.ct import spine_midline_column

if TYPE_CHECKING:
    from inference.tasks.spine_bmd_levels import BodyRun

__all__ = ["IN_SLICE", "SpineGeometry", "spine_geometry", "vertebra_mask"]


@dataclass
class SpineGeometry:
    """What the profile pass found: slab column, anterior cortex row per slice, AP rows, profile and runs."""

    column: int
    ap_rows: tuple[int, int]
    profile: np.ndarray
    anterior_row: np.ndarray = field(default_factory=lambda: np.zeros(0))
    runs: list[BodyRun] = field(default_factory=list)
    sacrum: BodyRun | None = None
    anchor: str = ""


#: 8-connectivity within a slice, none across slices
IN_SLICE = np.zeros((3, 3, 3), dtype=bool)
IN_SLICE[1] = True


def _dilate_in_slice(mask: np.ndarray) -> np.ndarray:
    """One-pixel 3x3 dilation of every slice of a (slices, rows, cols) mask (separable, no copy per slice)."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    out = rows.copy()
    out[:, :, 1:] |= rows[:, :, :-1]
    out[:, :, :-1] |= rows[:, :, 1:]
    return out


def vertebra_mask(bone: np.ndarray, spacing: tuple[float, float], *, vertebra_width_mm: float = 34.0,
                  vertebra_depth_mm: float = 40.0) -> np.ndarray:
    """The bone of each axial slice that belongs to a vertebra (level finding, step 1).

    ``bone`` is a (slices, rows, cols) or (rows, cols) bone mask, ``spacing`` the (row, column) pixel
    spacing. Components are found within each slice after a one-pixel dilation, so a cortex broken by
    noise stays whole while a fat plane of two pixels or more still separates; a component is kept when
    it spans at least ``vertebra_width_mm`` across or ``vertebra_depth_mm`` from front to back.
    """
    stack = np.asarray(bone, dtype=bool)
    if stack.ndim == 2:
        return vertebra_mask(stack[None], spacing, vertebra_width_mm=vertebra_width_mm,
                             vertebra_depth_mm=vertebra_depth_mm)[0]
    labels, n = ndimage.label(_dilate_in_slice(stack), structure=IN_SLICE)
    if n == 0:
        return np.zeros_like(stack)
    keep = np.zeros(n + 1, dtype=bool)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            depth = (sl[1].stop - sl[1].start) * float(spacing[0])
            width = (sl[2].stop - sl[2].start) * float(spacing[1])
            keep[i] = depth >= vertebra_depth_mm or width >= vertebra_width_mm
    return keep[labels] & stack


def spine_geometry(
    volume_hu: np.ndarray,
    positions: Sequence[float] | np.ndarray,
    pixel_spacing: tuple[float, float],
    *,
    cortex_hu: float = 300.0,
    slab_mm: float = 10.0,
    anterior_band_mm: float = 12.0,
    body_depth_mm: float = 45.0,
    vertebra_width_mm: float = 34.0,
    vertebra_depth_mm: float = 40.0,
) -> SpineGeometry:
    """Midline column, anterior cortex row per slice and the cortical-bone profile (level finding, steps 1-3).

    ``volume_hu`` is (slices, rows, cols) HU in stack order with anterior towards
    row 0 (flip it first otherwise); ``positions`` the slice positions (mm).
    ``ap_rows`` spans from the most anterior cortex to ``body_depth_mm`` behind
    the most posterior one: where a body's box centre may lie.
    """
    vol = np.asarray(volume_hu)
    pos = np.asarray(positions, dtype=float)
    if vol.ndim != 3 or len(pos) != vol.shape[0]:
        raise ValueError(f"need a (slices, rows, cols) volume and one position per slice, got {vol.shape}")
    n, rows = vol.shape[0], vol.shape[1]
    bone3 = vol > cortex_hu
    spine = vertebra_mask(bone3, pixel_spacing, vertebra_width_mm=vertebra_width_mm,
                          vertebra_depth_mm=vertebra_depth_mm)
    col = spine_midline_column(spine, threshold=0.5)
    half = max(1, int(round(slab_mm / 2.0 / float(pixel_spacing[1]))))
    cols = slice(max(0, col - half), col + half + 1)
    bone = bone3[:, :, cols].any(axis=2)  # (slices, rows)
    in_spine = spine[:, :, cols].any(axis=2)
    has = in_spine.any(axis=1)
    if not has.any():
        return SpineGeometry(col, (0, 0), np.zeros(n), np.zeros(n))
    first = np.where(has, in_spine.argmax(axis=1), -1).astype(float)
    idx = np.arange(n)
    ant = np.interp(idx, idx[has], first[has])
    step = float(np.median(np.abs(np.diff(pos)))) if n > 1 else 1.0
    win = max(3, int(round(20.0 / max(step, 1e-3))) | 1)
    ant = ndimage.median_filter(ant, size=win, mode="nearest")
    band = max(2, int(round(anterior_band_mm / float(pixel_spacing[0]))))
    lead = max(1, int(round(2.0 / float(pixel_spacing[0]))))
    profile = np.zeros(n)
    for k in range(n):
        r0 = int(max(0, round(ant[k]) - lead))
        profile[k] = bone[k, r0:min(rows, r0 + band + lead)].sum()
    depth = int(round(body_depth_mm / float(pixel_spacing[0])))
    ap = (int(max(0, ant.min() - lead)), int(min(rows - 1, ant.max() + depth)))
    return SpineGeometry(col, ap, profile, ant)
