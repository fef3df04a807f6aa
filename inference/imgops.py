"""Geometric image operations on 2-D float images: 3x3 homogeneous affine matrices, warping and disk morphology.

Coordinates follow :mod:`inference.findings`: ``x`` = column, ``y`` = row, (0, 0)
at the centre of the top-left pixel; matrices map column vectors ``(x, y, 1)``.
The radiograph pre-processing (:mod:`inference.radiograph`) is built on these;
they are written for speed on CPU (bilinear sampling through ``grid_sample``,
block averaging before strong shrinks, disk morphology from row prefix sums)
and tested against scipy's reference implementations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

__all__ = ["apply_affine", "disk_morphology", "grid_to_source", "mask_contour", "letterbox_matrix", "rotation_about", "scaling", "translation", "warp"]


def translation(tx: float, ty: float) -> np.ndarray:
    """3x3 matrix translating (x, y) by (tx, ty)."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def rotation_about(angle_deg: float, cx: float, cy: float) -> np.ndarray:
    """3x3 matrix rotating (x, y) by ``angle_deg`` about (cx, cy); positive is clockwise on screen (y down)."""
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return translation(cx, cy) @ rot @ translation(-cx, -cy)


def scaling(sx: float, sy: float) -> np.ndarray:
    """3x3 pixel-centre-aligned resampling: pixel edges (-0.5) map onto pixel edges."""
    return translation(-0.5, -0.5) @ np.diag([sx, sy, 1.0]) @ translation(0.5, 0.5)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map an (N, 2) array of (x, y) points through a 3x3 matrix."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    homo = np.hstack([pts, np.ones((len(pts), 1))]) @ np.asarray(matrix, dtype=np.float64).T
    return homo[:, :2]


def warp(image: np.ndarray, src_to_dst: np.ndarray, out_hw: tuple[int, int], *, order: int = 1,
         cval: float = 0.0) -> np.ndarray:
    """Resample ``image`` onto an ``out_hw`` grid given the source->destination (x, y) matrix.

    Destination pixels that fall outside the source get ``cval``. When the
    transform shrinks the image, the source is Gaussian-smoothed first
    (sigma = (1/scale - 1) / 2) so thin structures do not alias; at a scale of
    1/4 or less it is block-averaged by an integer factor first
    (:func:`_block_reduce`) and smoothed with the remaining sigma, a fraction of
    the cost of smoothing the full-resolution image.
    """
    src = np.asarray(image, dtype=np.float32)
    m = np.asarray(src_to_dst, dtype=np.float64)
    xs, ys = grid_to_source(np.linalg.inv(m), out_hw)
    eps = 1e-6  # outside the source pixel centres, as scipy's "constant" mode
    outside = (xs < -eps) | (xs > src.shape[1] - 1 + eps) | (ys < -eps) | (ys > src.shape[0] - 1 + eps)
    reduced = False
    if order > 0:
        scale = float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        sigma = (1.0 / scale - 1.0) / 2.0 if scale < 0.95 else 0.0
        factor = int(1.0 / (2.0 * scale)) if scale > 0 else 1  # the reduced grid keeps 2x the output's rate
        if factor >= 2 and min(src.shape) >= 2 * factor:
            reduced = True
            src, to_src = _block_reduce(src, factor)
            m = m @ to_src
            xs, ys = (xs - to_src[0, 2]) / factor, (ys - to_src[1, 2]) / factor
            # the box adds a variance of (k^2 - 1) / 12 source px^2, bilinear interpolation on the
            # coarser grid (k^2 - 1) / 6 more on average: the Gaussian supplies the rest
            sigma = float(np.sqrt(max(sigma**2 - (factor**2 - 1) / 4.0, 0.0))) / factor
        if sigma > 0.0:
            src = ndimage.gaussian_filter(src, sigma=sigma, mode="nearest")
    if order == 1:
        out = _bilinear(src, xs, ys)
    else:
        swap = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        rc = swap @ np.linalg.inv(m) @ swap  # destination (row, col) -> source (row, col)
        out = ndimage.affine_transform(src, rc[:2, :2], offset=rc[:2, 2], output_shape=tuple(out_hw), order=order,
                                       mode="nearest" if reduced else "constant", cval=cval,
                                       prefilter=False).astype(np.float32)
    out[outside] = cval
    return out


def _bilinear(src: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``src`` at source positions (xs, ys), clamped at the border.

    Same weights as ``scipy.ndimage.affine_transform`` with ``order=1``, through
    ``torch.nn.functional.grid_sample`` (several times faster).
    """
    h, w = src.shape
    grid = np.empty((1, *xs.shape, 2), dtype=np.float32)
    grid[0, ..., 0] = (2.0 * xs + 1.0) / w - 1.0  # align_corners=False: pixel edges at -1 and 1
    grid[0, ..., 1] = (2.0 * ys + 1.0) / h - 1.0
    image = torch.from_numpy(np.require(src, np.float32, ["C", "W"]))[None, None]
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(image, torch.from_numpy(grid), mode="bilinear", padding_mode="border",
                                              align_corners=False)
    return out[0, 0].numpy()


def _block_reduce(image: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``factor`` x ``factor`` blocks whose centres span the whole image, and the reduced->source matrix.

    The image is edge-padded so that the first and last block centres lie on
    or beyond the first and last source pixel centres.
    """
    k = factor
    lead = k // 2
    pads = [(lead, math.ceil((n + lead + (k - 1) / 2.0) / k) * k - n - lead) for n in image.shape]
    padded = np.pad(image, pads, mode="edge")
    out = np.zeros((padded.shape[0] // k, padded.shape[1] // k), dtype=np.float32)
    for i in range(k):
        for j in range(k):
            out += padded[i::k, j::k]
    out *= np.float32(1.0 / (k * k))
    return out, translation(-lead, -lead) @ np.linalg.inv(scaling(1.0 / k, 1.0 / k))


def grid_to_source(dst_to_src: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source (x, y) of every pixel of an ``out_hw`` grid, as two (H, W) arrays."""
    oh, ow = out_hw
    xx = np.arange(ow, dtype=np.float64)[None, :]
    yy = np.arange(oh, dtype=np.float64)[:, None]
    a = dst_to_src
    return a[0, 0] * xx + a[0, 1] * yy + a[0, 2], a[1, 0] * xx + a[1, 1] * yy + a[1, 2]


def letterbox_matrix(src_hw: tuple[float, float], out_hw: tuple[int, int]) -> np.ndarray:
    """Scale ``src_hw`` uniformly to fit ``out_hw`` and centre it (padding, never cropping)."""
    h, w = src_hw
    oh, ow = out_hw
    s = min(oh / h, ow / w)
    pad_x = (ow - w * s) / 2.0
    pad_y = (oh - h * s) / 2.0
    return translation(pad_x, pad_y) @ scaling(s, s)


def disk_morphology(mask: np.ndarray, radius: int, *, erode: bool = False) -> np.ndarray:
    """Binary dilation (or erosion) by the disk ``x^2 + y^2 <= r^2``, the border counting as background.

    Same result as ``scipy.ndimage.binary_dilation`` / ``binary_erosion`` with
    that disk as structure, at a fraction of the cost: the disk is a stack of
    horizontal segments, each segment's count is a difference of row prefix
    sums, and the rows are combined with shifts.
    """
    r = max(1, int(radius))
    h, w = mask.shape
    csum = np.zeros((h, w + 2 * r + 1), dtype=np.int32)  # csum[:, j] = sum of padded columns [0, j)
    np.cumsum(mask, axis=1, dtype=np.int32, out=csum[:, r + 1: r + 1 + w])
    csum[:, r + 1 + w:] = csum[:, r + w: r + w + 1]
    segments: dict[int, np.ndarray] = {}
    out = np.zeros((h, w), dtype=bool) if not erode else np.ones((h, w), dtype=bool)
    for dy in range(-r, r + 1):
        if abs(dy) >= h:
            continue
        half = math.isqrt(r * r - dy * dy)
        seg = segments.get(half)
        if seg is None:
            count = csum[:, r + half + 1: r + half + 1 + w] - csum[:, r - half: r - half + w]
            seg = segments[half] = count == 2 * half + 1 if erode else count > 0
        dst, src = (out[: h - dy], seg[dy:]) if dy >= 0 else (out[-dy:], seg[: h + dy])
        if erode:
            dst &= src
        else:
            dst |= src
    if erode:  # rows within r of the top or bottom see the background border
        out[:r] = False
        out[max(0, h - r):] = False
    return out


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """The one-pixel outline of a 2-D mask (4-neighbour erosion, the image border counting as background)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)
