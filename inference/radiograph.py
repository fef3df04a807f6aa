"""Radiograph pre-processing shared by ``wrist_fracture`` and ``physis_fracture`` (training and inference).

Pipeline (wrist thesis, section 4.2.2, with the corrections recorded in the task spec):

1. :func:`to_float` - DICOM pixels to [0, 1], "high = dense", through
   :func:`inference.pixels.display_array` (MONOCHROME1 inverted from the header).
   The thesis's corner-mean inversion (:func:`fix_polarity`) runs only when the
   header is unreliable, and is idempotent.
2. :func:`split_parts` - Otsu, morphological close, connected components; parts
   below ``min_share`` of the image (markers, noise) are dropped, each remaining
   part is one sample with its box in source pixels.
3. :func:`find_alignment` - Otsu, close then open, PCA of the foreground; the long
   axis becomes vertical and the wide end (fingers) points up.
4. :func:`prepare` - crop, rotate, letterbox to 2:3 with black and resize to
   341x512 (W x H) in *one* interpolation, then normalise with
   (:data:`MEAN`, :data:`STD`). Training augmentation (random crop 90-100 % of the
   area + horizontal flip p=0.5, no colour inversion) is folded into the same
   transform.

Coordinates follow :mod:`inference.findings`: ``x`` = column, ``y`` = row, (0, 0)
at the centre of the top-left pixel. Every :class:`PreparedImage` carries the
3x3 homogeneous matrix from source pixels to model pixels, so boxes and heat maps
predicted in model space map back to the source image exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from pydicom import Dataset
from scipy import ndimage

from inference.imgops import (  # noqa: F401  (re-exported: the radiograph API has always offered them)
    apply_affine,
    disk_morphology,
    grid_to_source,
    letterbox_matrix,
    rotation_about,
    scaling,
    translation,
    warp,
)
from inference.pixels import display_array

log = logging.getLogger(__name__)

MODEL_WIDTH = 341
MODEL_HEIGHT = 512
MEAN = 0.34587
STD = 0.22898
CORNER_THRESHOLD = 100.0 / 255.0
DETECTOR_LONG_SIDE = 1024
ANALYSIS_MAX_SIDE = 512  # Otsu / components / PCA run on a copy downscaled to this long side

_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


# --------------------------------------------------------------------------- step 1: float + polarity


def header_is_reliable(ds: Dataset) -> bool:
    """Whether the header's Photometric Interpretation can be trusted for polarity.

    It cannot for colour or unknown photometric interpretations and for
    Secondary Capture objects (often screen grabs with inversion burnt in).
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    sop_class = str(ds.get("SOPClassUID", ""))
    return photometric in _MONOCHROME and not sop_class.startswith(_SECONDARY_CAPTURE_PREFIX)


def _corner_patches(image: np.ndarray, fraction: float) -> list[np.ndarray]:
    h, w = image.shape
    ph, pw = max(2, int(round(h * fraction))), max(2, int(round(w * fraction)))
    return [image[:ph, :pw], image[:ph, -pw:], image[-ph:, :pw], image[-ph:, -pw:]]


def corner_mean(image: np.ndarray, fraction: float = 0.05) -> float:
    """Mean of the means of the four corner patches (thesis eq. 4.1a), on the [0, 1] scale."""
    return float(np.mean([p.astype(np.float64).mean() for p in _corner_patches(image, fraction)]))


def needs_inversion(image: np.ndarray, threshold: float = CORNER_THRESHOLD, fraction: float = 0.05) -> bool:
    """Decide from the corners whether a [0, 1] image has a white background.

    The thesis inverts when the corner mean ``S >= T`` (T = 100/255), so an image
    with ``T <= S <= 1 - T`` is inverted again on a second pass. Here the band is
    resolved antisymmetrically: ``S > 1 - T`` inverts, ``S < T`` does not, and in
    between the image is inverted only if its corners are brighter than its
    centre (central half of each side) by more than 1e-3. Since inverting negates
    that comparison, an image and its inverse are never both inverted, which
    makes :func:`fix_polarity` idempotent.
    """
    s = corner_mean(image, fraction)
    if s < threshold:
        return False
    if s > 1.0 - threshold:
        return True
    h, w = image.shape
    centre = float(image[h // 4: h - h // 4, w // 4: w - w // 4].astype(np.float64).mean())
    return s > centre + 1e-3


def fix_polarity(image: np.ndarray, threshold: float = CORNER_THRESHOLD) -> np.ndarray:
    """Corner-mean inversion fallback (idempotent): ``fix_polarity(fix_polarity(x)) == fix_polarity(x)``."""
    if needs_inversion(image, threshold):
        return (1.0 - image).astype(np.float32)
    return image


def to_float(ds: Dataset, frame: int | None = None, *, header_reliable: bool | None = None) -> np.ndarray:
    """A radiograph as float32 in [0, 1] with bone bright (2-D; one frame of a multi-frame object).

    Parameters
    ----------
    ds:
        DX/CR/SC dataset.
    frame:
        0-based frame index (default: the first frame of a multi-frame object).
    header_reliable:
        Trust the header's polarity; None decides with :func:`header_is_reliable`.
        Only when it is False does the corner-mean fallback run.
    """
    image = display_array(ds, frame)
    if image.ndim == 3:
        image = image[0]
    if header_reliable is None:
        header_reliable = header_is_reliable(ds)
    if not header_reliable:
        image = fix_polarity(image)
    return image


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


# --------------------------------------------------------------------------- step 4: model input


@dataclass
class PreparedImage:
    """A model input plus the exact transform from the source image's pixel grid.

    Attributes
    ----------
    tensor:
        float32 tensor (1, H, W), normalised with (mean, std).
    source_to_model:
        3x3 matrix mapping source (x, y) to model (x, y).
    source_shape:
        (rows, columns) of the source image.
    bbox:
        The part's (x0, y0, x1, y1) in source pixels, end-exclusive.
    angle_deg:
        Rotation applied (clockwise on screen positive).
    hflip:
        Whether a horizontal flip (augmentation) was applied.
    """

    tensor: torch.Tensor
    source_to_model: np.ndarray
    source_shape: tuple[int, int]
    bbox: tuple[int, int, int, int]
    angle_deg: float = 0.0
    hflip: bool = False
    mean: float = MEAN
    std: float = STD

    @property
    def model_to_source(self) -> np.ndarray:
        """Inverse of :attr:`source_to_model`."""
        return np.linalg.inv(self.source_to_model)

    @property
    def model_shape(self) -> tuple[int, int]:
        """(rows, columns) of the model input."""
        return int(self.tensor.shape[-2]), int(self.tensor.shape[-1])

    def points_to_source(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) model-space (x, y) points to source pixels."""
        return apply_affine(self.model_to_source, points)

    def box_to_source(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Axis-aligned source box enclosing a model-space (x0, y0, x1, y1) box, clipped to the image."""
        x0, y0, x1, y1 = box
        corners = self.points_to_source(np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
        rows, cols = self.source_shape
        return (float(np.clip(corners[:, 0].min(), 0, cols - 1)), float(np.clip(corners[:, 1].min(), 0, rows - 1)),
                float(np.clip(corners[:, 0].max(), 0, cols - 1)), float(np.clip(corners[:, 1].max(), 0, rows - 1)))

    def map_to_source(self, array: np.ndarray, *, order: int = 1) -> np.ndarray:
        """Resample a model-space map (e.g. a Grad-CAM of any resolution) onto the source pixel grid.

        ``array`` covers the whole model input; a coarser map is aligned by pixel
        edges. Source pixels outside the model's field of view get 0.
        """
        mh, mw = self.model_shape
        ah, aw = array.shape
        model_to_array = scaling(aw / mw, ah / mh)
        src_to_array = model_to_array @ self.source_to_model
        return warp(np.asarray(array, dtype=np.float32), np.linalg.inv(src_to_array), self.source_shape, order=order)

    def display(self) -> np.ndarray:
        """The model input back on the [0, 1] scale (H, W), for overlays and debugging."""
        return (self.tensor[0].numpy() * self.std + self.mean).astype(np.float32)


def _augmentation_matrix(out_hw: tuple[int, int], rng: np.random.Generator,
                         crop_area: tuple[float, float] = (0.9, 1.0), flip_p: float = 0.5) -> tuple[np.ndarray, bool]:
    """Random crop of 90-100 % of the area (aspect kept, resized back) and a horizontal flip."""
    oh, ow = out_hw
    side = float(np.sqrt(rng.uniform(*crop_area)))
    cw, ch = ow * side, oh * side
    x0 = rng.uniform(0.0, ow - cw)
    y0 = rng.uniform(0.0, oh - ch)
    # crop window [x0, x0+cw] x [y0, y0+ch] (pixel edges) -> full output
    m = translation(-0.5, -0.5) @ np.diag([ow / cw, oh / ch, 1.0]) @ translation(0.5 - x0, 0.5 - y0)
    flip = bool(rng.random() < flip_p)
    if flip:
        m = np.array([[-1.0, 0.0, ow - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m, flip


def prepare(
    image: np.ndarray,
    *,
    bbox: tuple[int, int, int, int] | None = None,
    align: bool = True,
    out_hw: tuple[int, int] = (MODEL_HEIGHT, MODEL_WIDTH),
    mean: float = MEAN,
    std: float = STD,
    rng: np.random.Generator | None = None,
) -> PreparedImage:
    """One part of a [0, 1] radiograph as a model input (steps 3-4, plus augmentation when ``rng`` is given).

    The part crop is rotated about its centre onto a canvas that holds the whole
    rotated crop, letterboxed (black padding, centred, nothing cropped) to the
    2:3 ``out_hw`` and resampled once from the source with bilinear
    interpolation. With ``rng``, the training augmentation is composed in.
    """
    rows, cols = image.shape
    x0, y0, x1, y1 = bbox if bbox is not None else (0, 0, cols, rows)
    crop = image[y0:y1, x0:x1]
    if crop.size == 0:
        raise ValueError(f"empty part box {bbox} for an image of shape {image.shape}")
    m = translation(-x0, -y0)
    angle = 0.0
    ch, cw = crop.shape
    if align:
        al = find_alignment(crop)
        angle = al.angle_deg
        corners = apply_affine(al.matrix, np.array([[-0.5, -0.5], [cw - 0.5, -0.5], [-0.5, ch - 0.5],
                                                    [cw - 0.5, ch - 0.5]]))
        lo = corners.min(axis=0)
        hi = corners.max(axis=0)
        m = translation(-lo[0] - 0.5, -lo[1] - 0.5) @ al.matrix @ m
        canvas_hw = (hi[1] - lo[1], hi[0] - lo[0])
    else:
        canvas_hw = (float(ch), float(cw))
    m = letterbox_matrix(canvas_hw, out_hw) @ m
    flip = False
    if rng is not None:
        aug, flip = _augmentation_matrix(out_hw, rng)
        m = aug @ m
    # Warp from a slightly padded crop (1 px of real context) so borders interpolate against real pixels.
    px0, py0 = max(0, x0 - 1), max(0, y0 - 1)
    px1, py1 = min(cols, x1 + 1), min(rows, y1 + 1)
    src = image[py0:py1, px0:px1]
    to_src_crop = translation(px0, py0)
    pixels = warp(src, m @ to_src_crop, out_hw)
    pixels = _mask_outside_crop(pixels, m, (x0, y0, x1, y1), out_hw)
    tensor = torch.from_numpy((pixels - mean) / std).unsqueeze(0)
    return PreparedImage(tensor, m, (rows, cols), (x0, y0, x1, y1), angle, flip, mean, std)


def augment(prepared: PreparedImage, rng: np.random.Generator) -> PreparedImage:
    """Training augmentation of an already prepared image (for trainers that cache :func:`prepare` outputs).

    Random crop of 90-100 % of the area resized back, and a horizontal flip with
    p = 0.5 (no colour inversion), composed into the transform. This resamples
    the model-space image a second time; :func:`prepare` with ``rng`` does it in
    one interpolation from the source.
    """
    out_hw = prepared.model_shape
    aug, flip = _augmentation_matrix(out_hw, rng)
    pixels = warp(prepared.display(), aug, out_hw)
    tensor = torch.from_numpy((pixels - prepared.mean) / prepared.std).unsqueeze(0)
    return PreparedImage(tensor, aug @ prepared.source_to_model, prepared.source_shape, prepared.bbox,
                         prepared.angle_deg, flip != prepared.hflip, prepared.mean, prepared.std)


def _mask_outside_crop(pixels: np.ndarray, m: np.ndarray, bbox: tuple[int, int, int, int],
                       out_hw: tuple[int, int]) -> np.ndarray:
    """Black out model pixels whose source position lies outside the part box (other parts, markers)."""
    x0, y0, x1, y1 = bbox
    xs, ys = grid_to_source(np.linalg.inv(m), out_hw)
    inside = (xs >= x0 - 0.5) & (xs <= x1 - 0.5) & (ys >= y0 - 0.5) & (ys <= y1 - 0.5)
    return np.where(inside, pixels, np.float32(0.0)).astype(np.float32, copy=False)


def prepare_dataset(ds: Dataset, *, frame: int | None = None, split: bool = True, align: bool = True,
                    min_share: float = 0.02, header_reliable: bool | None = None,
                    rng: np.random.Generator | None = None) -> list[PreparedImage]:
    """Full wrist pipeline for one DICOM image: one :class:`PreparedImage` per anatomic part."""
    image = to_float(ds, frame, header_reliable=header_reliable)
    parts = split_parts(image, min_share=min_share) if split else [Part((0, 0, image.shape[1], image.shape[0]), 1.0)]
    return [prepare(image, bbox=p.bbox, align=align, rng=rng) for p in parts]


# --------------------------------------------------------------------------- physis detector / classifier inputs


def detector_input(image: np.ndarray, *, long_side: int = DETECTOR_LONG_SIDE, square: bool = True,
                   mean: float = MEAN, std: float = STD) -> PreparedImage:
    """Letterbox a [0, 1] radiograph for the detector with its long side at ``long_side`` (no crop, black pad).

    With ``square`` the canvas is ``long_side`` x ``long_side``; otherwise it
    keeps the image's aspect (no padding at all). Images are scaled (up or down)
    so the long side is exactly ``long_side``.
    """
    rows, cols = image.shape
    s = long_side / max(rows, cols)
    out_hw = (long_side, long_side) if square else (max(1, round(rows * s)), max(1, round(cols * s)))
    m = letterbox_matrix((float(rows), float(cols)), out_hw)
    pixels = warp(image, m, out_hw)
    tensor = torch.from_numpy((pixels - mean) / std).unsqueeze(0)
    return PreparedImage(tensor, m, (rows, cols), (0, 0, cols, rows), 0.0, False, mean, std)


def crop_with_margin(image: np.ndarray, box: tuple[float, float, float, float], *, margin: float = 0.2,
                     min_side: int = 32, out_size: int | None = None, mean: float = MEAN,
                     std: float = STD) -> PreparedImage:
    """Full-resolution crop around a source-space box for the crop classifier.

    The box grows by ``margin`` of its width/height on each side, to at least
    ``min_side`` pixels, and is clipped to the image (never beyond it). With
    ``out_size`` the crop is letterboxed to a square of that size (black pad);
    otherwise it is returned at native resolution.
    """
    rows, cols = image.shape
    bx0, by0, bx1, by1 = box
    bw, bh = bx1 - bx0, by1 - by0
    gx = max(bw * margin, (min_side - bw) / 2.0, 0.0)
    gy = max(bh * margin, (min_side - bh) / 2.0, 0.0)
    x0 = int(np.clip(np.floor(bx0 - gx), 0, cols - 1))
    y0 = int(np.clip(np.floor(by0 - gy), 0, rows - 1))
    x1 = int(np.clip(np.ceil(bx1 + gx) + 1, x0 + 1, cols))
    y1 = int(np.clip(np.ceil(by1 + gy) + 1, y0 + 1, rows))
    crop = np.asarray(image[y0:y1, x0:x1], dtype=np.float32)
    m = translation(-x0, -y0)
    if out_size is not None:
        lb = letterbox_matrix(crop.shape, (out_size, out_size))
        crop = warp(crop, lb, (out_size, out_size))
        m = lb @ m
    tensor = torch.from_numpy((crop - mean) / std).unsqueeze(0)
    return PreparedImage(tensor, m, (rows, cols), (x0, y0, x1, y1), 0.0, False, mean, std)
