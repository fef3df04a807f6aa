"""RGB Secondary Capture overlays with burned-in AI annotations.

Each :class:`inference.findings.Overlay` becomes one single-frame RGB SC image:
a header ("AI RESULT - NOT FOR DIAGNOSTIC USE ALONE", algorithm name/version,
the overlay's subject and ``Findings.summary``, the statement the SR and the
demo table show too) above one panel or a montage of panels. Panels show the
source image through the shared display pipeline
(:func:`inference.pixels.display_array`) with a heat map (cividis, a colour-vision-deficiency-safe map; alpha
up to 0.4), mask contours, and boxes with label and score, each structure in its
colour from :mod:`inference.palette`; the panel's caption sits under the picture.
All text is wrapped to the image width and drawn on a dark backing; box labels
are placed greedily so that they stay inside the picture and do not overlap
(:mod:`dicomnode.results.layout`). The SC copies patient and study from the
source, gets a new series, and says ``BurnedInAnnotation = YES``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from pydicom import Dataset
from scipy import ndimage

from dicomnode.errors import ResultWriteError
from dicomnode.results import ResultContext
from dicomnode.results.common import finish, header_for_copy, series_description, series_number, series_uid
from dicomnode.results.layout import (
    MIN_FONT,
    PAD,
    Font,
    Rect,
    draw_text_block,
    font,
    inside,
    leader,
    line_height,
    place_labels,
    wrap,
)
from inference.findings import Box, Findings, Overlay, Panel, statement
from inference.imgops import mask_contour
from inference.palette import HEATMAP_CMAP, RGB, colour_for
from inference.pixels import display_array

log = logging.getLogger(__name__)

BANNER = "AI RESULT - NOT FOR DIAGNOSTIC USE ALONE"
HEATMAP_ALPHA = 0.4
SINGLE_MAX = 1024  # longest side of a single-panel overlay
SINGLE_MIN = 384
CELL = 384  # montage cell size
BANNER_FG = (255, 215, 0)
HEADER_FG = (255, 255, 255)
STATEMENT_FG = (255, 255, 255)
CAPTION_FG = (255, 255, 255)


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
    colour = colormaps[HEATMAP_CMAP](h)[..., :3].astype(np.float32)
    alpha = (HEATMAP_ALPHA * h)[..., None]
    return rgb * (1.0 - alpha) + colour * alpha


@dataclass
class Drawn:
    """A rendered tile or overlay and the text rectangles drawn on it (for layout checks)."""

    image: Image.Image
    labels: list[Rect] = field(default_factory=list)  # box labels
    text: list[Rect] = field(default_factory=list)  # every text backing (labels, legend, caption, header)

    def shifted(self, dx: int, dy: int) -> tuple[list[Rect], list[Rect]]:
        """The rectangles moved by (dx, dy)."""
        move = lambda r: (r[0] + dx, r[1] + dy, r[2] + dx, r[3] + dy)  # noqa: E731
        return [move(r) for r in self.labels], [move(r) for r in self.text]


def panel_font_size(width: int, height: int) -> int:
    """Label and caption font size for a tile of ``width`` x ``height`` pixels."""
    return int(np.clip(round(min(width, height) / 24), 12, 20))


def _picture(panel: Panel, grey: np.ndarray, target: tuple[int, int]) -> tuple[Image.Image, float]:
    """The panel's picture (grey, heat map, contours) scaled to fit ``target`` (rows, columns)."""
    rows, cols = grey.shape
    scale = min(target[0] / rows, target[1] / cols)
    out_shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    rgb = np.repeat(_resize_float(grey, out_shape)[..., None], 3, axis=2)
    if panel.heatmap is not None:
        rgb = _heat_blend(rgb, panel.heatmap)
    for label, mask in panel.contours.items():
        m = _resize_float(np.asarray(mask, np.float32), out_shape, nearest=True) > 0.5
        edge = mask_contour(m)
        grow = max(1, round(scale / 2))  # at least 2 px wide; iterations=0 would dilate the whole panel
        edge = ndimage.binary_dilation(edge, iterations=grow)
        rgb[edge] = np.array(colour_for(label), np.float32) / 255.0
    return Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)), scale


def _box_rect(box: Box, scale: float, dx: int) -> Rect:
    # pixel-centre coordinates -> corner coordinates of the scaled picture
    return (int(box.x0 * scale + scale / 2) + dx, int(box.y0 * scale + scale / 2),
            int(math.ceil(box.x1 * scale + scale / 2)) + dx, int(math.ceil(box.y1 * scale + scale / 2)))


def _draw_labels(draw: ImageDraw.ImageDraw, items: list[tuple[str, Rect, RGB]], area: tuple[int, int],
                 size: int, reserved: list[Rect]) -> tuple[list[Rect], list[str]]:
    """Place and draw box labels (largest font that places them all); return rects and unplaced texts."""
    texts = [(t, a) for t, a, _ in items]
    for s in range(size, MIN_FONT - 1, -1):
        rects = place_labels(texts, font(s), area[0], area[1], reserved)
        if all(r is not None for r in rects):
            break
    f = font(s)
    drawn, missing = [], []
    for (text, anchor, colour), rect in zip(items, rects, strict=True):
        if rect is None:
            missing.append(text)
            continue
        line = leader(rect, anchor)
        if line is not None:
            draw.line(line, fill=colour, width=1)
        drawn.append(draw_text_block(draw, [text], f, rect[0], rect[1], colour))
    return drawn, missing


def box_text(box: Box) -> str:
    """The label drawn beside a box: the task's ``Box.text``, else its finding and score."""
    return box.text or f"{box.label.meaning} {box.score:.2f}"


def render_panel(panel: Panel, by_uid: dict[str, Dataset], target: tuple[int, int], grow: bool = False) -> Drawn:
    """Draw one panel into a tile of ``target`` (rows, columns): picture, box labels, legend, caption.

    The caption goes under the picture on black, wrapped to the tile width. With
    ``grow`` the tile is as high as the picture plus the caption; otherwise the
    picture shrinks so that both fit ``target``.
    """
    grey = panel_grey(panel, by_uid)
    width = int(target[1])
    size = panel_font_size(width, int(target[0]))
    f = font(size)
    lines = wrap(panel.caption, f, width - 2 * PAD - 8) if panel.caption else []
    strip = len(lines) * line_height(f) + 2 * PAD + 6 if lines else 0
    pic, scale = _picture(panel, grey, (max(8, target[0] - (0 if grow else strip)), width))
    height = pic.height + strip if grow else int(target[0])
    tile = Image.new("RGB", (width, height), (0, 0, 0))
    dx = (width - pic.width) // 2
    tile.paste(pic, (dx, 0))
    draw = ImageDraw.Draw(tile)
    area = (width, pic.height)
    items = []
    line_w = max(2, pic.height // 256)
    for box in panel.boxes:
        colour = colour_for(box.label.meaning)
        anchor = _box_rect(box, scale, dx)
        draw.rectangle([anchor[0], anchor[1], anchor[2] - 1, anchor[3] - 1], outline=colour, width=line_w)
        items.append((box_text(box), anchor, colour))
    text: list[Rect] = []
    y = 3
    for label in panel.contours:  # legend, top left
        rect = draw_text_block(draw, [label], f, dx + 3, y, colour_for(label))
        if inside(rect, *area):
            text.append(rect)
        y = rect[3] + 1
    labels, missing = _draw_labels(draw, items, area, size, list(text))
    if missing:  # no room on the picture: the labels join the caption (the tile keeps its size)
        log.debug("overlay: %d box label(s) moved to the caption", len(missing))
        lines = wrap(statement(panel.caption, *missing), f, width - 2 * PAD - 8)
    if lines:
        room = (tile.height - pic.height - 3 - 2 * PAD) // line_height(f)
        if len(lines) > room and grow:  # labels joined the caption: the tile grows to hold it
            taller = Image.new("RGB", (width, pic.height + 3 + len(lines) * line_height(f) + 2 * PAD + 3), (0, 0, 0))
            taller.paste(tile, (0, 0))
            tile, draw = taller, ImageDraw.Draw(taller)
        elif len(lines) > room:  # a montage cell keeps its size: cut the caption, marked with an ellipsis
            lines = lines[:max(0, room)]
            if lines:
                lines[-1] = lines[-1][:max(0, len(lines[-1]) - 2)] + " \u2026"
        if lines:
            text.append(draw_text_block(draw, lines, f, 4, pic.height + 3, CAPTION_FG))
    return Drawn(tile, labels, text + labels)


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _body(overlay: Overlay, by_uid: dict[str, Dataset]) -> Drawn:
    if len(overlay.panels) == 1:
        grey_shape = panel_grey(overlay.panels[0], by_uid).shape
        longest = max(grey_shape)
        scale = min(SINGLE_MAX / longest, max(1.0, SINGLE_MIN / longest))
        target = (max(1, round(grey_shape[0] * scale)), max(SINGLE_MIN, round(grey_shape[1] * scale)))
        return render_panel(overlay.panels[0], by_uid, target, grow=True)
    n_rows, n_cols = _grid(len(overlay.panels))
    body = Drawn(Image.new("RGB", (n_cols * CELL, n_rows * CELL), (0, 0, 0)))
    for i, panel in enumerate(overlay.panels):
        tile = render_panel(panel, by_uid, (CELL - 4, CELL - 4))
        r, c = divmod(i, n_cols)
        x, y = c * CELL + 2, r * CELL + 2
        body.image.paste(tile.image, (x, y))
        labels, text = tile.shifted(x, y)
        body.labels += labels
        body.text += text
    return body


def header_lines(overlay: Overlay, findings: Findings, f: Font, width: int) -> list[tuple[str, RGB]]:
    """The banner, the algorithm, the overlay's subject and the findings statement, wrapped to ``width``."""
    algo = f"{findings.algorithm_name} v{findings.algorithm_version}"
    if findings.synthetic_model:
        algo += " - model trained on synthetic data"
    out = [(line, BANNER_FG) for line in wrap(BANNER, f, width)]
    out += [(line, HEADER_FG) for line in wrap(algo, f, width)]
    if overlay.title and overlay.title != findings.summary:
        out += [(line, HEADER_FG) for line in wrap(overlay.title, f, width)]
    # with one overlay per image (or scan), say that the statement is the study's
    study = f"Study: {findings.summary}" if len(findings.overlays) > 1 and findings.summary else findings.summary
    out += [(line, STATEMENT_FG) for line in wrap(study, f, width)]
    return out


def compose_layout(overlay: Overlay, findings: Findings, by_uid: dict[str, Dataset]) -> Drawn:
    """Render an overlay (header + panel or montage) and report every text rectangle on it."""
    body = _body(overlay, by_uid)
    width = max(body.image.width, 480)
    width += width % 2  # even dimensions keep every viewer's RGB handling simple
    size = max(14, min(22, width // 44))
    f = font(size)
    lines = header_lines(overlay, findings, f, width - 16)
    lh = line_height(f) + 2 * PAD  # backings of consecutive lines touch but do not overlap
    banner_h = len(lines) * lh + 10
    height = banner_h + body.image.height
    canvas = Image.new("RGB", (width, height + height % 2), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    text = []
    for i, (line, colour) in enumerate(lines):
        text.append(draw_text_block(draw, [line], f, 6, 4 + i * lh, colour))
    dx = (width - body.image.width) // 2
    canvas.paste(body.image, (dx, banner_h))
    labels, body_text = body.shifted(dx, banner_h)
    return Drawn(canvas, labels, text + body_text)


def compose(overlay: Overlay, findings: Findings, by_uid: dict[str, Dataset]) -> np.ndarray:
    """Render an overlay (header + panel or montage) to an RGB uint8 array."""
    return np.asarray(compose_layout(overlay, findings, by_uid).image, dtype=np.uint8).copy()


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
    sc.ImageComments = image_comments(overlay, findings)
    sc.SourceImageSequence = [_source_item(ref.sop_instance_uid, ref.frame_number, by_uid) for ref in refs]
    if "FrameOfReferenceUID" in ref_ds:
        sc.FrameOfReferenceUID = ref_ds.FrameOfReferenceUID
    return finish(sc, ref_ds, context, description)


def image_comments(overlay: Overlay, findings: Findings) -> str:
    """ImageComments of an overlay: its subject and the findings statement (the words drawn on it)."""
    parts = [overlay.title] if overlay.title and overlay.title != findings.summary else []
    parts += [findings.summary] if findings.summary else []
    return ". ".join(p.rstrip(". ") for p in parts)[:10240] or "AI result overlay"


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
