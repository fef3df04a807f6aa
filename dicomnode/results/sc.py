"""RGB Secondary Capture overlays with burned-in AI annotations.

Each :class:`inference.findings.Overlay` becomes one single-frame RGB SC image:
a banner ("AI RESULT - NOT FOR DIAGNOSTIC USE ALONE", algorithm name/version,
overlay title) above one panel or a montage of panels. Panels show the source
image through the shared display pipeline (:func:`inference.pixels.display_array`)
with a heat map (jet colour map, alpha up to 0.4), mask contours in one colour per
label, and boxes with label and score. The SC copies patient and study from the
source, gets a new series, and says ``BurnedInAnnotation = YES``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from scipy import ndimage

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results.common import finish, header_for_copy, series_description, series_number, series_uid
from inference.findings import Findings, Overlay, Panel
from inference.imgops import mask_contour
from inference.pixels import display_array

log = logging.getLogger(__name__)

BANNER = "AI RESULT - NOT FOR DIAGNOSTIC USE ALONE"
HEATMAP_ALPHA = 0.4
SINGLE_MAX = 1024  # longest side of a single-panel overlay
SINGLE_MIN = 384
CELL = 384  # montage cell size
PALETTE = [
    (255, 64, 64), (64, 200, 255), (80, 255, 80), (255, 200, 0), (255, 80, 255), (0, 255, 200), (255, 140, 0),
]
BOX_COLOUR = (255, 230, 0)
BANNER_FG = (255, 215, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def _colour(label: str, order: dict[str, int]) -> tuple[int, int, int]:
    if label not in order:
        order[label] = len(order)
    return PALETTE[order[label] % len(PALETTE)]


def panel_grey(panel: Panel, by_uid: dict[str, Dataset]) -> np.ndarray:
    """The panel's greyscale picture in [0, 1] (source pixels through the display pipeline)."""
    if panel.pixels is not None:
        grey = np.asarray(panel.pixels, dtype=np.float32)
    else:
        ref = panel.image
        ds = by_uid.get(ref.sop_instance_uid) if ref is not None else None
        if ref is None or ds is None:
            raise ResultWriteError("overlay panel references an image that is not among the sources")
        frame = ref.frame_number - 1 if ref.frame_number else (0 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
        grey = display_array(ds, frame)
    if grey.ndim != 2:
        raise ResultWriteError(f"overlay panel pixels must be 2-D, got shape {grey.shape}")
    return np.clip(np.nan_to_num(grey), 0.0, 1.0)


def _resize_float(arr: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    if arr.shape == shape:
        return arr.astype(np.float32)
    img = Image.fromarray(arr.astype(np.float32))
    img = img.resize((shape[1], shape[0]), Image.NEAREST if nearest else Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _heat_blend(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    h = np.nan_to_num(_resize_float(np.asarray(heat, np.float32), rgb.shape[:2]))
    top = float(h.max())
    if top > 1.0:
        h = h / top
    h = np.clip(h, 0.0, 1.0)
    colour = colormaps["jet"](h)[..., :3].astype(np.float32)
    alpha = (HEATMAP_ALPHA * h)[..., None]
    return rgb * (1.0 - alpha) + colour * alpha


def render_panel(
    panel: Panel, by_uid: dict[str, Dataset], target: tuple[int, int], colours: dict[str, int]
) -> Image.Image:
    """Draw one panel scaled to fit ``target`` (rows, columns), keeping its aspect ratio."""
    grey = panel_grey(panel, by_uid)
    rows, cols = grey.shape
    scale = min(target[0] / rows, target[1] / cols)
    out_shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    rgb = np.repeat(_resize_float(grey, out_shape)[..., None], 3, axis=2)
    if panel.heatmap is not None:
        rgb = _heat_blend(rgb, panel.heatmap)
    for label, mask in panel.contours.items():
        m = _resize_float(np.asarray(mask, np.float32), out_shape, nearest=True) > 0.5
        edge = mask_contour(m)
        grow = int(scale) // 2
        if grow > 0:  # iterations=0 would make scipy dilate until nothing changes (the whole panel)
            edge = ndimage.binary_dilation(edge, iterations=grow)
        rgb[edge] = np.array(_colour(label, colours), np.float32) / 255.0
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    size = max(12, out_shape[0] // 32)
    font = _font(size)
    width = max(2, out_shape[0] // 256)
    for box in panel.boxes:
        # pixel-centre coordinates -> corner coordinates of the scaled picture
        x0, y0 = box.x0 * scale + scale / 2, box.y0 * scale + scale / 2
        x1, y1 = box.x1 * scale + scale / 2, box.y1 * scale + scale / 2
        draw.rectangle([x0, y0, x1, y1], outline=BOX_COLOUR, width=width)
        text = f"{box.label.meaning} {box.score:.2f}"
        ty = y0 - size - 4 if y0 - size - 4 >= 0 else y1 + 2
        draw.text((x0 + 1, ty + 1), text, fill=(0, 0, 0), font=font)
        draw.text((x0, ty), text, fill=BOX_COLOUR, font=font)
    if panel.caption:
        draw.text((6, out_shape[0] - size - 6), panel.caption, fill=(0, 0, 0), font=font)
        draw.text((5, out_shape[0] - size - 7), panel.caption, fill=(255, 255, 255), font=font)
    if panel.contours:
        y = 5
        for label in panel.contours:
            draw.text((5, y), label, fill=_colour(label, colours), font=font)
            y += size + 2
    return img


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def compose(overlay: Overlay, findings: Findings, by_uid: dict[str, Dataset]) -> np.ndarray:
    """Render an overlay (banner + panel or montage) to an RGB uint8 array."""
    colours: dict[str, int] = {}
    if len(overlay.panels) == 1:
        grey_shape = panel_grey(overlay.panels[0], by_uid).shape
        longest = max(grey_shape)
        scale = min(SINGLE_MAX / longest, max(1.0, SINGLE_MIN / longest))
        target = (max(1, round(grey_shape[0] * scale)), max(1, round(grey_shape[1] * scale)))
        body = render_panel(overlay.panels[0], by_uid, target, colours)
    else:
        n_rows, n_cols = _grid(len(overlay.panels))
        body = Image.new("RGB", (n_cols * CELL, n_rows * CELL), (0, 0, 0))
        for i, panel in enumerate(overlay.panels):
            tile = render_panel(panel, by_uid, (CELL - 4, CELL - 4), colours)
            r, c = divmod(i, n_cols)
            x = c * CELL + (CELL - tile.width) // 2
            y = r * CELL + (CELL - tile.height) // 2
            body.paste(tile, (x, y))
    width = max(body.width, 480)
    size = max(14, min(32, width // 40))
    font = _font(size)
    lines = [BANNER, f"{findings.algorithm_name} v{findings.algorithm_version}: {overlay.title}"]
    if findings.synthetic_model:
        lines.append("model trained on synthetic data")
    banner_h = len(lines) * (size + 6) + 8
    canvas = Image.new("RGB", (width, banner_h + body.height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((8, 6 + i * (size + 6)), line, fill=BANNER_FG if i == 0 else (255, 255, 255), font=font)
    canvas.paste(body, ((width - body.width) // 2, banner_h))
    # even dimensions keep every viewer's RGB handling simple
    arr = np.asarray(canvas, dtype=np.uint8)
    return arr[: arr.shape[0] - arr.shape[0] % 2, : arr.shape[1] - arr.shape[1] % 2].copy()


_DIRECTIONS = (("L", "R"), ("P", "A"), ("H", "F"))


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = ""
    order = np.argsort(-np.abs(np.asarray(vector, float)))
    for axis in order:
        v = float(vector[axis])
        if abs(v) > 0.25:
            letters += _DIRECTIONS[axis][0] if v > 0 else _DIRECTIONS[axis][1]
    return letters[:3]


def patient_orientation(overlay: Overlay, ds: Dataset) -> tuple[str, str] | None:
    """Row/column directions of a single-panel overlay of ``ds``; None for montages or unknown."""
    if len(overlay.panels) != 1 or overlay.panels[0].image is None:
        return None
    po = ds.get("PatientOrientation")
    if po and len(po) == 2 and all(po):
        return str(po[0]), str(po[1])
    iop = ds.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        return _orientation_letters(iop[:3]), _orientation_letters(iop[3:])
    return None


def build_sc(
    overlay: Overlay, index: int, findings: Findings, by_uid: dict[str, Dataset], context: ResultContext
) -> Dataset:
    """Build one RGB Secondary Capture for ``overlay`` (instance number ``index``)."""
    refs = list(overlay.derived_from) or [p.image for p in overlay.panels if p.image is not None]
    if not refs:
        refs = list(findings.source_images[:1])
    ref_ds = by_uid[refs[0].sop_instance_uid]
    pixels = compose(overlay, findings, by_uid)
    orientation = patient_orientation(overlay, ref_ds)
    description = series_description(findings.task, "sc", findings.algorithm_version)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header_for_copy(ref_ds),
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid(context, "sc"),
            series_number=series_number(context, "sc"),
            sop_instance_uid=str(hd.UID()),
            instance_number=index,
            manufacturer=context.manufacturer[:64],
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
    except (ValueError, TypeError) as exc:
        raise ResultWriteError(f"cannot build secondary capture: {exc}") from exc
    if orientation is None:
        sc.PatientOrientation = None  # Type 2: unknown for montages and images without geometry
    sc.Laterality = None  # Type 2C: one SC series may hold overlays of either side
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO" if ref_ds.get("Modality") not in ("XC", "OP") else "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.DerivationDescription = f"{findings.algorithm_name} {findings.algorithm_version} overlay: {overlay.title}"[:1024]
    sc.ImageComments = overlay.title[:10240]
    sc.SourceImageSequence = [_source_item(ref.sop_instance_uid, ref.frame_number, by_uid) for ref in refs]
    if "FrameOfReferenceUID" in ref_ds:
        sc.FrameOfReferenceUID = ref_ds.FrameOfReferenceUID
    return finish(sc, ref_ds, context, description)


def _source_item(uid: str, frame: int | None, by_uid: dict[str, Dataset]) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = by_uid[uid].SOPClassUID
    item.ReferencedSOPInstanceUID = uid
    if frame:
        item.ReferencedFrameNumber = frame
    return item


def build_scs(findings: Findings, by_uid: dict[str, Dataset], context: ResultContext) -> list[Dataset]:
    """One secondary capture per overlay of ``findings``, numbered 1..n."""
    return [build_sc(o, i, findings, by_uid, context) for i, o in enumerate(findings.overlays, start=1)]
