"""Contact sheets: a PNG grid of generated images with their labels, boxes and label-map outlines, for people
to look at."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont

from training.synth.manifest import read_manifest

log = logging.getLogger(__name__)

__all__ = ["MaskSlicer", "contact_sheet", "display_image", "sheet_from_folder"]

_BOX_COLOURS = {"fracture": (255, 60, 60), "metal": (60, 160, 255), "text": (255, 200, 0),
                "normal": (0, 255, 0), "osteopenia": (255, 160, 0), "osteoporosis": (255, 60, 60)}
#: outline colours of label-map values 1, 2, 3, ... (femur, tibia, fibula for knee_bone_seg)
_MASK_COLOURS = ((255, 80, 80), (80, 200, 255), (255, 220, 0), (120, 255, 120), (220, 120, 255))


def display_image(ds: pydicom.Dataset) -> np.ndarray:
    """uint8 display image of one frame: rescale, window if present, MONOCHROME1 inverted."""
    a = ds.pixel_array.astype(np.float64)
    if a.ndim == 3:
        a = a[a.shape[0] // 2]
    a = a * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if "WindowCenter" in ds and "WindowWidth" in ds:
        c = float(np.atleast_1d(ds.WindowCenter)[0])
        w = float(np.atleast_1d(ds.WindowWidth)[0])
        lo, hi = c - w / 2, c + w / 2
    a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        a = 1.0 - a
    return (a * 255).astype(np.uint8)


def _boxes_by_sop(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        for b in r.get("boxes") or []:
            out.setdefault(b["sop_instance_uid"], []).append(b)
    return out


def _chosen_files(root: Path, boxes: dict[str, list[dict[str, Any]]], per_series: int) -> Iterator[Path]:
    """Radiographs all; of a slice series (files in one series folder), the slices with boxes or else the
    middle ones, at most ``per_series`` spread over the series (the first slices of a CT show no anatomy).

    Lazy, folder by folder: a caller that stops early reads no more headers.
    """
    for folder in sorted({f.parent for f in Path(root).rglob("*.dcm")}):
        files = sorted(folder.glob("*.dcm"))
        if len(files) <= 2:
            yield from files
            continue
        files.sort(key=lambda f: int(pydicom.dcmread(f, stop_before_pixels=True).get("InstanceNumber", 0) or 0))
        boxed = [f for f in files if f.stem in boxes]
        pool = boxed or files[len(files) // 4:len(files) - len(files) // 4] or files
        step = max(1, len(pool) // per_series)
        yield from pool[step // 2::step][:per_series]


class MaskSlicer:
    """The label-map slice under a DICOM slice, by geometry: the map's voxel that contains the slice's
    ImagePositionPatient along the map's slice axis (manifest rows with ``mask``, e.g. knee_bone_seg)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _load(self, rel: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if rel not in self._cache:
            import SimpleITK as sitk

            from inference.series import from_sitk

            labels, affine = from_sitk(sitk.ReadImage(str(self.root / rel)))
            step = affine[:3, 0]  # one slice along the map's slice axis
            # one study at a time: files come in folder order
            self._cache = {rel: (labels, affine[:3, 3], step / float(step @ step))}
        return self._cache[rel]

    def __call__(self, row: dict[str, Any], ds: pydicom.Dataset) -> np.ndarray | None:
        """(rows, cols) label slice, or None when the row has no mask or the slice lies outside it."""
        rel = row.get("mask")
        if not rel or "ImagePositionPatient" not in ds:
            return None
        labels, origin, per_slice = self._load(str(rel))
        k = int(round(float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64) - origin, per_slice))))
        if not 0 <= k < labels.shape[0] or labels.shape[1:] != (ds.Rows, ds.Columns):
            return None
        return labels[k]


def _outline(labels: np.ndarray, size: tuple[int, int]) -> list[tuple[int, np.ndarray]]:
    """Per label value > 0, the boolean outline of its region at display ``size`` (width, height)."""
    from inference.imgops import mask_contour  # the overlays' outline; lazy, generators need not load torch

    big = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
    return [(int(v), mask_contour(big == v)) for v in np.unique(big[big > 0])]


def sheet_from_folder(root: Path, out_png: Path, *, max_images: int = 16, tile: int = 256,
                      per_series: int = 4) -> Path:
    """Draw up to ``max_images`` images of a labelled folder, each with its label and boxes.

    Slice series contribute up to ``per_series`` slices each (those with boxes, else the middle ones).
    """
    rows = read_manifest(root)
    by_study = {r.get("study_uid"): r for r in rows if r.get("study_uid")}
    by_sop = {r.get("sop_instance_uid"): r for r in rows if r.get("sop_instance_uid")}
    boxes = _boxes_by_sop(rows)
    masks = MaskSlicer(Path(root))
    files = _chosen_files(Path(root), boxes, per_series)
    tiles: list[Image.Image] = []
    font = ImageFont.load_default(size=14)
    for f in files:
        ds = pydicom.dcmread(f)
        row = by_sop.get(ds.SOPInstanceUID) or by_study.get(ds.StudyInstanceUID) or {}
        img = display_image(ds)
        h, w = img.shape
        k = tile / max(h, w)
        im = Image.fromarray(img).convert("RGB").resize((max(1, int(w * k)), max(1, int(h * k))))
        label_slice = masks(row, ds)
        names: list[str] = []
        if label_slice is not None:
            px = np.asarray(im).copy()
            value_names = {int(v): str(n) for n, v in (row.get("labels") or {}).items()}
            for v, edge in _outline(label_slice, im.size):
                px[edge] = _MASK_COLOURS[(v - 1) % len(_MASK_COLOURS)]
                names.append(value_names.get(v, str(v)))
            im = Image.fromarray(px)
        canvas = Image.new("RGB", (tile, tile + 18))
        canvas.paste(im, ((tile - im.width) // 2, 0))
        draw = ImageDraw.Draw(canvas)
        ox = (tile - im.width) // 2
        for b in boxes.get(ds.SOPInstanceUID, []):
            draw.rectangle([ox + b["x0"] * k, b["y0"] * k, ox + b["x1"] * k, b["y1"] * k],
                           outline=_BOX_COLOURS.get(b.get("label", ""), (0, 255, 0)), width=2)
        levels = [f"{b['level']} {b.get('label', '')}" for b in boxes.get(ds.SOPInstanceUID, []) if "level" in b]
        if levels:
            text = f"{ds.get('PatientAge', '')} {', '.join(levels)}"
        elif label_slice is not None:
            text = f"{ds.get('PatientAge', '')} {row.get('orientation', '')} {' '.join(names) or 'no bone'}"
        else:
            text = f"{ds.get('ViewPosition', '')} {ds.get('PatientAge', '')} label={row.get('label', '?')}"
        draw.text((3, tile + 1), text, fill=(255, 255, 255), font=font)
        tiles.append(canvas)
        if len(tiles) >= max_images:
            break
    if not tiles:
        raise FileNotFoundError(f"no DICOM images under {root}")
    ncol = min(4, len(tiles))
    nrow = -(-len(tiles) // ncol)
    sheet = Image.new("RGB", (ncol * tile, nrow * (tile + 18)), (40, 40, 40))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % ncol) * tile, (i // ncol) * (tile + 18)))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


def contact_sheet(task: str, out_png: Path, n: int, seed: int, **kwargs: Any) -> Path:
    """Generate ``n`` studies of ``task`` into a temporary folder and draw them."""
    from training.synth.cli import load_generator

    gen = load_generator(task)
    with tempfile.TemporaryDirectory(prefix="synth-preview-") as tmp:
        gen.generate(Path(tmp), n, seed, workers=1, **kwargs)  # type: ignore[attr-defined]
        return sheet_from_folder(Path(tmp), out_png, max_images=max(4, 2 * n), per_series=2)
