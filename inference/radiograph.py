"""Radiograph pre-processing shared by ``wrist_fracture`` and ``physis_fracture`` (training and inference).

Pipeline (wrist thesis, section 4.2.2, with the corrections recorded in the task spec):

1. :func:`to_float` - DICOM pixels to [0, 1], "high = dense", through
   :func:`inference.pixels.display_array` (MONOCHROME1 inverted from the header).
   The thesis's corner-mean inversion (:func:`fix_polarity`) runs only when the
   header is unreliable, and is idempotent.
2. :func:`~inference.radiograph_parts.split_parts` - Otsu, morphological close, connected components; parts
   below ``min_share`` of the image (markers, noise) are dropped, each remaining
   part is one sample with its box in source pixels.
3. :func:`~inference.radiograph_parts.find_alignment` - Otsu, close then open, PCA of the foreground; the long
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
from inference.radiograph_parts import Part, find_alignment, split_parts

log = logging.getLogger(__name__)

MODEL_WIDTH = 341
MODEL_HEIGHT = 512
MEAN = 0.34587
STD = 0.22898
CORNER_THRESHOLD = 100.0 / 255.0
DETECTOR_LONG_SIDE = 1024

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
