"""Radiograph analysis, steps 2 and 3 of :mod:`inference.radiograph`: anatomic parts and their alignment.

2. :func:`split_parts` - Otsu, morphological close, connected components; parts
   below ``min_share`` of the image (markers, noise) are dropped, each remaining
   part is one sample with its box in source pixels.
3. :func:`find_alignment` - Otsu, close then open, PCA of the foreground; the long
   axis becomes vertical and the wide end (fingers) points up.

Both work on a binary foreground of a [0, 1] "high = dense" image (:func:`foreground_mask`, inside
the collimation, :func:`collimation_interior`), computed on a copy downscaled to
:data:`ANALYSIS_MAX_SIDE`; boxes and matrices come back in source pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.imgops import disk_morphology, rotation_about, scaling, warp

log = logging.getLogger(__name__)

__all__ = ["ANALYSIS_MAX_SIDE", "Alignment", "Part", "collimation_interior", "find_alignment", "foreground_mask",
           "otsu_threshold", "split_parts"]

ANALYSIS_MAX_SIDE = 512  # Otsu / components / PCA run on a copy downscaled to this long side


# --------------------------------------------------------------------------- step 2: splitter


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (maximum between-class variance over a ``bins`` histogram)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if hi <= lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m / w0
        mu1 = (m[-1] - m) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def _analysis_copy(image: np.ndarray, max_side: int = ANALYSIS_MAX_SIDE) -> tuple[np.ndarray, float]:
    """Downscaled copy for the binary analysis steps and its scale (analysis px per source px)."""
    scale = min(1.0, max_side / max(image.shape))
    if scale >= 1.0:
        return np.asarray(image, dtype=np.float32), 1.0
    out_hw = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    sy, sx = out_hw[0] / image.shape[0], out_hw[1] / image.shape[1]
    return warp(image, scaling(sx, sy), out_hw), float(np.sqrt(sx * sy))


def collimation_interior(image: np.ndarray, *, full: float = 0.9, max_depth: float = 0.25) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) inside a bright collimation frame (unexposed border bars).

    From each edge, rows/columns that are more than ``full`` foreground (Otsu)
    are peeled off, up to ``max_depth`` of the size; anatomy rarely fills 90 %
    of an edge row, a shutter bar always does.
    """
    mask = image > otsu_threshold(image)
    rows, cols = mask.shape
    r0, r1, c0, c1 = 0, rows, 0, cols
    for _ in range(2):  # a second pass catches corners left by the first
        while r0 < rows * max_depth and mask[r0, c0:c1].mean() > full:
            r0 += 1
        while rows - r1 < rows * max_depth and mask[r1 - 1, c0:c1].mean() > full:
            r1 -= 1
        while c0 < cols * max_depth and mask[r0:r1, c0].mean() > full:
            c0 += 1
        while cols - c1 < cols * max_depth and mask[r0:r1, c1 - 1].mean() > full:
            c1 -= 1
    return r0, r1, c0, c1


def foreground_mask(image: np.ndarray, *, close_frac: float = 0.02, open_frac: float = 0.01) -> np.ndarray:
    """Otsu foreground inside the collimation, then a morphological close and an open (disks sized to the image).

    A bright collimation frame (:func:`collimation_interior`) is excluded first,
    and Otsu's threshold is computed on the interior only.
    """
    r0, r1, c0, c1 = collimation_interior(image)
    mask = np.zeros(image.shape, dtype=bool)
    interior = image[r0:r1, c0:c1]
    if interior.size:
        mask[r0:r1, c0:c1] = interior > otsu_threshold(interior)
    side = max(image.shape)
    if close_frac > 0:
        r = max(1, round(side * close_frac))
        padded = np.pad(mask, r)  # pad so closing does not erode at the border
        mask = disk_morphology(disk_morphology(padded, r), r, erode=True)[r:-r, r:-r]
    if open_frac > 0:
        r = max(1, round(side * open_frac))
        mask = disk_morphology(disk_morphology(mask, r, erode=True), r)
    return mask


@dataclass(frozen=True)
class Part:
    """One anatomic part found by :func:`split_parts`.

    ``bbox`` is (x0, y0, x1, y1) in source pixel indices, end-exclusive
    (``image[y0:y1, x0:x1]``). ``share`` is the part's foreground area as a
    fraction of the image.
    """

    bbox: tuple[int, int, int, int]
    share: float


def split_parts(image: np.ndarray, *, min_share: float = 0.02, merge_overlap: float = 0.5) -> list[Part]:
    """Split a radiograph into its anatomic parts (thesis 4.2.2.3).

    Otsu foreground, a morphological close (2 % of the long side) so one arm is
    one component, connected components (8-connected); components under
    ``min_share`` of the image area are dropped (markers, text, noise), and
    components whose boxes overlap by more than ``merge_overlap`` of the smaller
    box are merged. Parts are ordered left to right. An image with no qualifying
    component yields a single part covering the whole image, so nothing is lost.
    """
    small, scale = _analysis_copy(image)
    mask = foreground_mask(small, close_frac=0.02, open_frac=0.0)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    h, w = image.shape
    boxes: list[list[float]] = []
    if n:
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)) / mask.size
        for idx, sl in enumerate(ndimage.find_objects(labels)):
            if sl is None or areas[idx] < min_share:
                continue
            boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, float(areas[idx])])
    boxes = _merge_overlapping(boxes, merge_overlap)
    if not boxes:
        log.info("no anatomic part above %.1f%% of the image; using the whole image", 100 * min_share)
        return [Part((0, 0, w, h), 1.0)]
    parts = []
    for x0, y0, x1, y1, share in sorted(boxes, key=lambda b: b[0]):
        parts.append(Part((max(0, int(np.floor(x0 / scale))), max(0, int(np.floor(y0 / scale))),
                           min(w, int(np.ceil(x1 / scale))), min(h, int(np.ceil(y1 / scale)))), share))
    return parts


def _merge_overlapping(boxes: list[list[float]], threshold: float) -> list[list[float]]:
    """Merge boxes (x0, y0, x1, y1, share) whose overlap exceeds ``threshold`` of the smaller box, until stable."""
    i = 0
    while i < len(boxes):
        a = boxes[i]
        for j in range(i + 1, len(boxes)):
            b = boxes[j]
            iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
            smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
            if iw > 0 and ih > 0 and iw * ih > threshold * smaller:
                boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]), a[4] + b[4]]
                del boxes[j]
                i = -1  # restart: the grown box may now overlap earlier ones
                break
        i += 1
    return boxes


# --------------------------------------------------------------------------- step 3: rotation


@dataclass(frozen=True)
class Alignment:
    """Result of :func:`find_alignment` for one image (or part crop).

    ``angle_deg`` is the rotation to apply, clockwise on screen positive, in
    (-180, 180]; ``matrix`` rotates about the image centre (x, y homogeneous);
    ``flipped`` says the 180-degree ambiguity was resolved by turning the PCA
    solution around.
    """

    angle_deg: float
    matrix: np.ndarray
    flipped: bool
    elongation: float


def find_alignment(image: np.ndarray, *, end_fraction: float = 0.3) -> Alignment:
    """Angle that makes the long axis vertical with the wide end (fingers) up (thesis 4.2.2.4).

    Otsu foreground, close then open, PCA of the foreground pixel coordinates.
    The first component is rotated onto the vertical. The 180-degree ambiguity
    is resolved with the width profile along the new vertical axis: the width of
    a row is the span (max x - min x) of its foreground, which also counts the
    gaps between spread fingers; the end whose widest rows (90th percentile of the
    row widths over ``end_fraction`` of the length) are wider is the hand and goes
    up, the narrower forearm down.
    """
    small, scale = _analysis_copy(image)
    mask = foreground_mask(small)
    h, w = image.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    ys, xs = np.nonzero(mask)
    if xs.size < 10:
        return Alignment(0.0, np.eye(3), False, 1.0)
    pts = np.stack([xs, ys], axis=1).astype(np.float64) / scale  # approx. source coordinates
    centred = pts - pts.mean(axis=0)
    evals, evecs = np.linalg.eigh(np.cov(centred.T))
    vx, vy = evecs[:, int(np.argmax(evals))]
    elongation = float(np.sqrt(max(evals.max(), 1e-12) / max(evals.min(), 1e-12)))
    angle = float(np.degrees(np.arctan2(vx, vy)))  # rotating by this maps (vx, vy) onto (0, 1)
    rotated = centred @ rotation_about(angle, 0.0, 0.0)[:2, :2].T
    flipped = _wide_end_is_bottom(rotated, end_fraction)
    if flipped:
        angle += 180.0
    angle = float((angle + 180.0) % 360.0 - 180.0)
    if angle == -180.0:
        angle = 180.0
    return Alignment(angle, rotation_about(angle, cx, cy), flipped, elongation)


def _wide_end_is_bottom(rotated: np.ndarray, end_fraction: float, bins: int = 64) -> bool:
    y = rotated[:, 1]
    x = rotated[:, 0]
    lo, hi = float(y.min()), float(y.max())
    if hi - lo < 1e-6:
        return False
    idx = np.minimum(((y - lo) / (hi - lo) * bins).astype(int), bins - 1)
    xmin = np.full(bins, np.inf)
    xmax = np.full(bins, -np.inf)
    np.minimum.at(xmin, idx, x)
    np.maximum.at(xmax, idx, x)
    span = np.where(np.isfinite(xmin), xmax - xmin, 0.0)
    k = max(1, int(round(bins * end_fraction)))
    # the widest rows of each end decide: the hand's palm / thumb / spread fingers are wider than the forearm,
    # while the mean would be pulled down by the rounded finger tips (lateral views: right only ~60 % of the time)
    return float(np.percentile(span[-k:], 90)) > float(np.percentile(span[:k], 90))
