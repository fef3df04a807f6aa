"""Render result objects to PNG so that a person (and the tests) can look at them.

``dicomnode render FILE.dcm --out PNG`` calls :func:`render_file`:

* a secondary capture (or any image) is written as shown (frames side by side),
* a SEG is drawn plane by plane as a montage: each segment filled in its
  Recommended Display CIELab Value (else its colour from :mod:`inference.palette`)
  with a legend, on black, or over the source images when they are given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from highdicom.color import CIELabColor
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.errors import InvalidDatasetError, ResultWriteError
from dicomnode.results.layout import draw_text_block, font, line_height
from dicomnode.results.sc import _resize_float
from inference.palette import RGB, colour_for
from inference.pixels import display_array, number_of_frames

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
FILL_ALPHA = 0.5


def _tile(images: Sequence[np.ndarray]) -> np.ndarray:
    """Lay RGB uint8 images of one size out in a near-square grid."""
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images[0].shape[:2]
    out = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        out[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    return out


def image_to_rgb(ds: Dataset) -> np.ndarray:
    """An image object as RGB uint8 (frames tiled); greyscale goes through the display pipeline."""
    if str(ds.get("PhotometricInterpretation", "")).upper() in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, raw=False)
        frames = list(arr) if number_of_frames(ds) > 1 else [arr]
        return _tile([np.asarray(f, np.uint8) for f in frames])
    frames = [display_array(ds, i) for i in range(number_of_frames(ds))]
    return _tile([np.repeat((np.clip(f, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2) for f in frames])


def seg_planes(ds: Dataset) -> tuple[list[tuple[str, int | None]], np.ndarray, dict[int, str]]:
    """Per-plane segment masks of a SEG without its sources.

    Returns
    -------
    planes:
        (referenced source SOP Instance UID, source frame or None) per plane, in SEG order.
    masks:
        bool array (planes, rows, columns, segments).
    labels:
        segment number -> segment label.
    """
    from pydicom.pixels import pixel_array

    labels = {int(s.SegmentNumber): str(s.get("SegmentLabel", s.SegmentNumber)) for s in ds.SegmentSequence}
    numbers = sorted(labels)
    raw = pixel_array(ds)
    if raw.ndim == 2:
        raw = raw[None]
    planes: list[tuple[str, int | None]] = []
    index: dict[tuple[str, int | None], int] = {}
    pending = []
    depth: dict[tuple[str, int | None], float] = {}
    normal = _normal(ds)
    for f, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        key: tuple[str, int | None] = (f"frame-{f}", None)
        deriv = fg.get("DerivationImageSequence")
        if deriv and deriv[0].get("SourceImageSequence"):
            src = deriv[0].SourceImageSequence[0]
            frames = src.get("ReferencedFrameNumber")
            key = (str(src.ReferencedSOPInstanceUID), int(frames) if frames not in (None, "") else None)
        else:
            pos = fg.get("PlanePositionSequence")
            if pos:
                key = (",".join(f"{v:.3f}" for v in pos[0].ImagePositionPatient), None)
        pos = fg.get("PlanePositionSequence")
        if normal is not None and pos:
            depth[key] = float(np.dot(normal, np.asarray(pos[0].ImagePositionPatient, float)))
        if key not in index:
            index[key] = len(planes)
            planes.append(key)
        pending.append((index[key], numbers.index(seg_no), f))
    if len(depth) == len(planes):  # order planes along the slice normal, as sorted sources are
        order = sorted(range(len(planes)), key=lambda i: depth[planes[i]])
        rank = {old: new for new, old in enumerate(order)}
        planes = [planes[i] for i in order]
        pending = [(rank[p], s, f) for p, s, f in pending]
    masks = np.zeros((len(planes), int(ds.Rows), int(ds.Columns), len(numbers)), bool)
    for p, s, f in pending:
        masks[p, :, :, s] |= raw[f].astype(bool)
    return planes, masks, labels


def _normal(ds: Dataset) -> np.ndarray | None:
    try:
        iop = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    except (AttributeError, IndexError, KeyError):
        return None
    return np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))


def segment_colours(ds: Dataset) -> dict[int, RGB]:
    """Segment number -> display colour: the SEG's Recommended Display CIELab Value, else the palette's."""
    out: dict[int, RGB] = {}
    for item in ds.SegmentSequence:
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None and len(lab) == 3:
            out[int(item.SegmentNumber)] = tuple(CIELabColor.from_dicom_value([int(v) for v in lab]).to_rgb(clip=True))
        else:
            out[int(item.SegmentNumber)] = colour_for(str(item.get("SegmentLabel", item.SegmentNumber)))
    return out


def render_seg(ds: Dataset, sources: Sequence[Dataset] | None = None) -> np.ndarray:
    """Montage of the SEG's planes, segments filled in colour, with a legend."""
    planes, masks, labels = seg_planes(ds)
    by_uid = {str(s.SOPInstanceUID): s for s in sources or ()}
    by_number = segment_colours(ds)
    palette = [by_number[n] for n in sorted(labels)]
    colours = np.array(palette, np.float32) / 255.0
    tiles = []
    for p, (uid, frame) in enumerate(planes):
        src = by_uid.get(uid)
        if src is not None:
            grey = display_array(src, (frame - 1) if frame else None)
            grey = _resize_float(grey, masks.shape[1:3]) if grey.shape != masks.shape[1:3] else grey
        else:
            grey = np.zeros(masks.shape[1:3], np.float32)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for s in range(masks.shape[3]):
            m = masks[p, :, :, s]
            alpha = FILL_ALPHA if src is not None else 1.0
            rgb[m] = rgb[m] * (1 - alpha) + colours[s] * alpha
        tiles.append((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    body = Image.fromarray(_tile(tiles))
    scale = max(1, 256 // max(body.height, 1))
    if scale > 1:
        body = body.resize((body.width * scale, body.height * scale), Image.NEAREST)
    f = font(14)
    lh = line_height(f) + 4
    canvas = Image.new("RGB", (max(body.width, 240), body.height + lh * len(labels) + 8), (0, 0, 0))
    canvas.paste(body, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, number in enumerate(sorted(labels)):
        draw_text_block(draw, [f"{number}: {labels[number]}"], f, 4, body.height + 4 + i * lh, palette[i])
    return np.asarray(canvas, np.uint8)


def render_dataset(ds: Dataset, sources: Sequence[Dataset] | None = None) -> np.ndarray:
    """RGB uint8 rendering of an SC, SEG or other image object."""
    if str(ds.get("SOPClassUID", "")) == SEGMENTATION_STORAGE:
        return render_seg(ds, sources)
    if "PixelData" not in ds:
        raise InvalidDatasetError("object has no pixel data to render (SR documents are not images)")
    return image_to_rgb(ds)


def render_file(path: Path, out_png: Path, sources: Sequence[Dataset] | None = None) -> Path:
    """Render the DICOM object at ``path`` to ``out_png``.

    Raises
    ------
    InvalidDatasetError
        If the file is not DICOM or has nothing to render.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise InvalidDatasetError(f"cannot read {path}: {exc}") from exc
    try:
        rgb = render_dataset(ds, sources)
    except (KeyError, AttributeError, ValueError) as exc:
        raise ResultWriteError(f"cannot render {path}: {exc}") from exc
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(out_png)
    return out_png
