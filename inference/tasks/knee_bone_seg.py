"""Task ``knee_bone_seg``: femur, tibia and fibula masks on a coronal or sagittal knee MR.

Pipeline (``tasks/knee_bone_seg.md``; pre-processing in :mod:`inference.mr`):

1. choose the series: MR, at least ``min_slices`` (20) planes, coronal or sagittal;
2. a square ``crop_mm`` window at the femur/tibia junction (intensity profile),
   in-plane resize to 224x224 with native slices, N4 bias correction on that
   stack (SimpleITK, shrink 4), a per-volume intensity scale (the median of the
   Otsu foreground becomes 1: MR has no absolute units) and the population
   z-score stored in the bundle (see :func:`prepare_knee` for the order);
3. the 2D U-Net on every slice, one sigmoid channel per bone;
4. post-processing on the model grid: threshold, largest 3-D connected
   component and 2-D hole filling per bone;
5. the exact inverse of crop + resize (:meth:`inference.mr.CropResize.mask_to_source`)
   back to the source pixel grid, one plane per source slice in series order.

Findings: one :class:`~inference.findings.Mask` per bone (SNOMED femur / tibia /
fibula, category "Anatomical Structure") with its volume in mm3, and an
:class:`~inference.findings.Overlay` montage of several slices with coloured contours.

Every step takes the task's settings, :class:`~inference.task_settings.KneeBoneSegSettings`,
read from the bundle's ``task_config`` (validated when the bundle loads). Training
(``training.tasks.knee_bone_seg``) calls :func:`choose_series`, :func:`prepare_knee` and
:func:`postprocess` with the same settings object, so both sides share one code path and one
definition of every setting.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from pydicom import Dataset
from scipy import ndimage

from inference import codes
from inference.errors import TaskError
from inference.findings import CUBIC_MM, Findings, ImageRef, Mask, Measurement, Overlay, Panel, statement
from inference.mr import CropResize, PreparedMR, ZScore, joint_centre, n4_correct
from inference.radiograph_parts import otsu_threshold
from inference.runtime import StageTimer, run_batched
from inference.series import Series, group_by_series
from inference.task_settings import KneeBoneSegSettings, settings_of
from inference.tasks import TaskContext, register_task
from inference.tasks.base import model_for

log = logging.getLogger(__name__)

__all__ = [
    "BONES", "BONE_CODES", "TASK", "bone_masks_to_source", "choose_series", "intensity_scale",
    "make_findings", "plane_of", "postprocess", "prepare_knee", "run_knee_bone_seg",
]

TASK = "knee_bone_seg"
BONES: tuple[str, ...] = ("femur", "tibia", "fibula")
BONE_CODES = {"femur": codes.FEMUR, "tibia": codes.TIBIA, "fibula": codes.FIBULA}
MONTAGE_PANELS = 6


# --------------------------------------------------------------------------- series selection


def plane_of(series: Series) -> str:
    """``"axial"``, ``"coronal"``, ``"sagittal"`` from the slice normal (``"unknown"`` without geometry)."""
    if not series.has_geometry:
        return "unknown"
    normal = series.affine[:3, 0]
    axis = int(np.argmax(np.abs(normal)))  # LPS: 0 = L-R (sagittal), 1 = A-P (coronal), 2 = S-I (axial)
    return ("sagittal", "coronal", "axial")[axis]


def choose_series(datasets: Sequence[Dataset], params: KneeBoneSegSettings) -> Series:
    """The MR series to segment: coronal or sagittal, at least ``min_slices`` planes, the most planes first.

    Raises
    ------
    TaskError
        If no series qualifies (the message says why each was rejected).
    """
    reasons: list[str] = []
    ok: list[Series] = []
    for n, (uid, series) in enumerate(group_by_series(datasets).items()):
        name = f"series {n + 1}"
        if series.modality != "MR":
            reasons.append(f"{name}: modality {series.modality or '?'}, not MR")
        elif len(series) < params.min_slices:
            reasons.append(f"{name}: {len(series)} slices < {params.min_slices}")
        elif plane_of(series) not in params.planes:
            reasons.append(f"{name}: {plane_of(series)} plane, need {' or '.join(params.planes)}")
        else:
            ok.append(series)
        log.debug("series %s: %d planes, %s", uid[-8:], len(series), plane_of(series))
    if not ok:
        raise TaskError(f"{TASK}: no usable knee MR series ({'; '.join(reasons) or 'no images'})")
    return max(ok, key=len)


# --------------------------------------------------------------------------- pre-processing


def intensity_scale(volume: np.ndarray) -> float:
    """Median of the Otsu foreground (the factor that brings tissue signal to about 1)."""
    vol = np.asarray(volume, dtype=np.float32)
    fg = vol[vol > otsu_threshold(vol)] if vol.size else vol
    med = float(np.median(fg)) if fg.size else float(vol.mean() if vol.size else 0.0)
    return med if med > 0 else 1.0


def prepare_knee(volume: np.ndarray, spacing: tuple[float, float, float], params: KneeBoneSegSettings,
                 norm: ZScore | None = None) -> PreparedMR:
    """Joint centre -> crop + resize -> N4 -> intensity scale -> z-score (``norm``, if given).

    The order follows the thesis (section 3.3): the square window is cut and
    resized first and N4 runs on the 224x224 stack ("a single 24x224x224
    image"), so its cost no longer depends on the acquisition matrix. The
    joint centre comes from the intensity profile of the raw volume (a smooth
    bias field barely moves the dark joint band). Returns a
    :class:`~inference.mr.PreparedMR` whose ``array`` is (slices, size, size) float32.
    """
    vol = np.asarray(volume, dtype=np.float32)
    centre = joint_centre(vol)
    crop = CropResize.around(centre, vol.shape[1:], (spacing[1], spacing[2]), crop_mm=params.crop_mm, out=params.size)
    arr = crop.image_to_model(vol)
    bias = None
    if params.n4:
        cell = (float(spacing[0]), crop.size_r * spacing[1] / params.size, crop.size_c * spacing[2] / params.size)
        arr, bias = n4_correct(arr, cell, shrink=params.n4_shrink)
    arr = arr / intensity_scale(arr)
    if norm is not None:
        arr = norm.apply(arr)
    return PreparedMR(arr.astype(np.float32), crop, centre, bias)


# --------------------------------------------------------------------------- post-processing


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (on each slice's bounding box: everything outside it is background)."""
    out = mask.copy()
    for k, plane in enumerate(mask):
        rows, cols = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
        if rows.size:
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            out[k][box] = ndimage.binary_fill_holes(plane[box])
    return out


def postprocess(probs: np.ndarray, params: KneeBoneSegSettings) -> np.ndarray:
    """(slices, bones, H, W) probabilities -> (bones, slices, H, W) boolean masks on the model grid."""
    p = np.asarray(probs)
    if p.ndim != 4:
        raise ValueError(f"expected (slices, bones, H, W) probabilities, got shape {p.shape}")
    masks = np.moveaxis(p >= params.threshold, 1, 0)
    out = np.zeros_like(masks, dtype=bool)
    for b in range(masks.shape[0]):
        m = masks[b]
        if params.largest_component and m.any():
            m = _largest_component(m)
        if params.fill_holes and m.any():
            m = _fill_holes_2d(m)
        out[b] = m
    return out


def bone_masks_to_source(masks: np.ndarray, crop: CropResize) -> np.ndarray:
    """(bones, slices, size, size) model-grid masks -> (bones, slices, rows, cols) on the source grid (exact)."""
    return crop.mask_to_source(masks)


# --------------------------------------------------------------------------- findings


def _image_refs(series: Series) -> tuple[ImageRef, ...]:
    return tuple(ImageRef(str(p.ds.SOPInstanceUID), None if p.frame is None else p.frame + 1) for p in series.planes)


def _montage_slices(union: np.ndarray, n_panels: int) -> list[int]:
    """Up to ``n_panels`` slice indices spread evenly over the slices that contain bone (else over all)."""
    idx = np.nonzero(union.reshape(union.shape[0], -1).any(axis=1))[0]
    if idx.size == 0:
        idx = np.arange(union.shape[0])
    if idx.size <= n_panels:
        return [int(i) for i in idx]
    pick = np.linspace(0, idx.size - 1, n_panels).round().astype(int)
    return sorted({int(idx[i]) for i in pick})


def make_findings(source_masks: np.ndarray, series: Series, *, algorithm_name: str, algorithm_version: str,
                  synthetic_model: bool, timings_s: dict[str, float] | None = None) -> Findings:
    """Findings of a (bones, slices, rows, cols) source-grid mask stack on ``series``.

    One Mask per bone (in :data:`BONES` order, empty bones included, so the SEG always has
    three segments) with its volume in mm3, and one contour montage.
    """
    refs = _image_refs(series)
    masks_arr = np.asarray(source_masks, dtype=bool)
    first = series.planes[0].ds
    expected = (len(BONES), len(refs), int(first.Rows), int(first.Columns))
    if masks_arr.shape != expected:
        raise TaskError(f"{TASK}: mask stack shape {masks_arr.shape} does not fit the series {expected}")
    voxel_mm3 = float(np.prod(series.spacing))
    masks: list[Mask] = []
    volumes: dict[str, float] = {}
    for b, bone in enumerate(BONES):
        code = BONE_CODES[bone]
        vol = float(masks_arr[b].sum()) * voxel_mm3
        volumes[bone] = vol
        masks.append(Mask(
            label=code, category=codes.ANATOMICAL_STRUCTURE, array=masks_arr[b], images=refs,
            finding_site=codes.KNEE, tracking_id=f"{bone} segmentation",
            measurements=[Measurement(codes.VOLUME, round(vol, 3), CUBIC_MM, finding_site=code)],
        ))
    union = masks_arr.any(axis=0)
    panels = []
    for k in _montage_slices(union, MONTAGE_PANELS):
        contours = {BONE_CODES[bone].meaning: masks_arr[b, k] for b, bone in enumerate(BONES) if masks_arr[b, k].any()}
        panels.append(Panel(image=refs[k], caption=f"slice {k + 1}/{len(refs)}", contours=contours))
    overlay = Overlay(panels=panels, title="Knee bone segmentation: femur, tibia, fibula",
                      derived_from=tuple(p.image for p in panels if p.image is not None))
    empty = [b for b in BONES if volumes[b] == 0.0]
    summary = statement("Bone volumes: " + ", ".join(f"{b} {volumes[b] / 1000.0:.1f} mL" for b in BONES),
                        f"not found: {', '.join(empty)}" if empty else "")
    return Findings(
        task=TASK, algorithm_name=algorithm_name, algorithm_version=algorithm_version,
        study_instance_uid=str(series.planes[0].ds.StudyInstanceUID), source_images=refs, masks=masks,
        overlays=[overlay], summary=summary, synthetic_model=synthetic_model, timings_s=dict(timings_s or {}),
    )


# --------------------------------------------------------------------------- the task


def predict_probabilities(model: torch.nn.Module, array: np.ndarray, device: torch.device, batch_size: int = 8
                          ) -> np.ndarray:
    """Sigmoid probabilities (slices, bones, H, W) of the U-Net on a (slices, H, W) z-scored stack."""
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).unsqueeze(1)
    logits = run_batched(model, x, batch_size, device)
    assert isinstance(logits, torch.Tensor)
    return torch.sigmoid(logits.float()).numpy()


def run_knee_bone_seg(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Segment femur, tibia and fibula on the study's coronal or sagittal knee MR.

    Raises
    ------
    TaskError
        No usable series.
    """
    timer = StageTimer()
    with timer.stage("load"):
        loaded = model_for(TASK, context)
        meta = loaded.meta
        params = settings_of(meta, KneeBoneSegSettings)
        series = choose_series(datasets, params)
        volume = series.volume()
    norm = ZScore(params.norm_mean, params.norm_std)
    with timer.stage("preprocess"):
        prepared = prepare_knee(volume, series.spacing, params, norm)
    with timer.stage("forward"):
        probs = predict_probabilities(loaded.model, prepared.array, loaded.device, params.batch_size)
    with timer.stage("postprocess"):
        model_masks = postprocess(probs, params)
        source_masks = bone_masks_to_source(model_masks, prepared.crop)
    log.info("%s: %d slices, plane %s, crop %s, stages %s", TASK, len(series), plane_of(series),
             prepared.crop.to_dict(), timer.log_line())
    return make_findings(source_masks, series, algorithm_name=meta.algorithm_name, algorithm_version=loaded.version,
                         synthetic_model=meta.synthetic_only, timings_s=timer.seconds)


register_task(TASK, run_knee_bone_seg)
