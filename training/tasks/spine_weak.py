"""Weak labels of ``spine_bmd``: vertebral-body pseudo-boxes from the task's own level finder.

A hospital has DXA classes per level (L1-L4), not boxes. With
``SpineBmdConfig.pseudo_boxes`` a study row that has ``vertebrae`` but no
``boxes`` is given boxes by the same profile pass the node runs
(:func:`inference.tasks.spine_bmd_levels.find_levels`): every slice of a named
body run gets the bounding box of the cortical bone in the region where that
pass puts the body (the anterior cortex row to ``body_depth_mm`` behind it, the
spine's midline column +- ``half_width_mm``), classed by the row's level class.
Boxes made this way carry ``"pseudo": true`` and the bundle records
``pseudo_boxes: true`` in its task config and model card.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inference.tasks.spine_bmd_levels import find_levels

__all__ = ["pseudo_boxes"]


def _slice_box(hu: np.ndarray, anterior_row: float, column: int, spacing: tuple[float, float], cortex_hu: float,
               anterior_up: bool, body_depth_mm: float, half_width_mm: float, canal_hu: float = 30.0
               ) -> tuple[float, ...] | None:
    """Box of the body on one axial slice: rows from the anterior cortex to the spinal canal (the first rows of
    the midline band darker than ``canal_hu`` after 15 mm), columns from the cortex of its front 60 %."""
    img = hu if anterior_up else hu[::-1]
    rows, cols = img.shape
    a = anterior_row if anterior_up else rows - 1 - anterior_row
    r0 = int(max(0, round(a - 2.0 / spacing[0])))
    r_max = int(min(rows, round(a + body_depth_mm / spacing[0]) + 1))
    band = max(1, int(round(4.0 / spacing[1])))
    mid = np.median(img[r0:r_max, max(0, column - band):column + band + 1], axis=1)
    start = int(round(15.0 / spacing[0]))
    dark = np.nonzero(mid[start:] < canal_hu)[0]
    r1 = r0 + start + int(dark[0]) if dark.size else r_max
    half = int(round(half_width_mm / spacing[1]))
    c0, c1 = max(0, column - half), min(cols, column + half + 1)
    front = r0 + max(1, int(0.6 * (r1 - r0)))
    rr, cc = np.nonzero(img[r0:front, c0:c1] > cortex_hu)
    if rr.size < 10 or r1 - r0 < 3:
        return None
    y0, y1 = float(r0 + rr.min()), float(r1)
    if not anterior_up:
        y0, y1 = float(rows - y1), float(rows - y0)
    return float(c0 + cc.min()), y0, float(c0 + cc.max() + 1), y1


def pseudo_boxes(volume: np.ndarray, positions: np.ndarray, spacing: tuple[float, float], sops: list[str],
                 classes: dict[str, Any], *, cortex_hu: float = 300.0, anterior_up: bool = True,
                 body_depth_mm: float = 40.0, half_width_mm: float = 30.0
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Manifest-style boxes (``sop_instance_uid``, x0..y1, ``level``, ``label`` = class, ``pseudo``) of the levels
    in ``classes`` that the level finder names, on every slice of their body runs, and the runs' extents
    (``levels`` of a manifest row: ``{"L1": {"z0_mm", "z1_mm"}}``, which place the disc negatives)."""
    geom = find_levels(volume, positions, spacing, cortex_hu=cortex_hu, anterior_up=anterior_up)
    out: list[dict[str, Any]] = []
    extents = {r.name: {"z0_mm": float(r.z0), "z1_mm": float(r.z1)} for r in geom.runs if r.name}
    for run in geom.runs:
        if run.name not in classes:
            continue
        for i in range(min(run.i0, run.i1), max(run.i0, run.i1) + 1):
            box = _slice_box(volume[i], float(geom.anterior_row[i]), geom.column, spacing, cortex_hu, anterior_up,
                             body_depth_mm, half_width_mm)
            if box is not None:
                out.append({"sop_instance_uid": sops[i], "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                            "level": run.name, "label": str(classes[run.name]), "pseudo": True})
    return out, extents
