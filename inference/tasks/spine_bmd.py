"""Task ``spine_bmd``: L1-L4 osteoporosis classes from a lumbar or abdominal CT (DSNet, Xue et al. 2022).

Pipeline (``tasks/spine_bmd.md``):

1. *load*: the axial CT series with the most slices (at least ``min_slices``);
   HU from the Modality LUT.
2. *levels*: a cheap HU-profile pass (:mod:`inference.tasks.spine_bmd_levels`)
   finds the vertebral bodies along the stack and names them L1..L5 from the
   sacrum upwards; per reported level (L1-L4) a few mid-body slices are picked.
3. *forward*: only those slices go through the Faster R-CNN (bone window
   W=2000/L=500, slice replicated to 3 channels, resized to the bundle's
   ``image_size``): about 12 detector passes per study instead of hundreds.
4. *postprocess*: per slice the body's box and class scores, per vertebra the
   mean class distribution over its mid-body slices, the mean HU of a central
   elliptical trabecular ROI (:func:`inference.ct.trabecular_roi`) and the
   patient-level class (the lowest of L1-L4, as in DXA reporting).

Findings: per vertebra a Classification (finding site L1..L4, class, class
probability, mean trabecular HU in [hnsf'U], its mid-body slice) and a Box on
that slice; a patient-level Classification (finding site lumbar spine); an
overlay montage of the sagittal reformat (levels marked) and the mid-vertebra
axial slices with their boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from pydicom import Dataset
from scipy import ndimage

from inference import codes
from inference.ct import BONE_WINDOW_CENTER, BONE_WINDOW_WIDTH, bone_window, sagittal_reformat, trabecular_roi
from inference.errors import InvalidDatasetError, TaskError
from inference.findings import (
    HU_UNIT,
    Box,
    Classification,
    Code,
    Findings,
    ImageRef,
    Measurement,
    Overlay,
    Panel,
    statement,
)
from inference.runtime import StageTimer, run_batched
from inference.series import Series, group_by_series
from inference.task_settings import SpineBmdSettings, settings_of
from inference.tasks import TaskContext, register_task
from inference.tasks.base import image_refs, model_for
from inference.tasks.spine_bmd_levels import (
    CLASS_NAMES,
    REPORTED_LEVELS,
    VertebraResult,
    aggregate_vertebra,
    find_levels,
    patient_class,
    select_slices,
    slice_class_scores,
)
from inference.tasks.spine_bmd_profile import SpineGeometry

log = logging.getLogger(__name__)

NAME = "spine_bmd"
CLASS_CODES: tuple[Code, ...] = (codes.NORMAL, codes.OSTEOPENIA, codes.OSTEOPOROSIS)
MEAN_TRABECULAR_HU = codes.ATTENUATION_COEFFICIENT

__all__ = [
    "CLASS_CODES", "NAME", "SpineAnalysis", "SpineParams", "analyze_volume", "prepare_slice", "select_series",
    "spine_bmd",
]


@dataclass(frozen=True)
class SpineParams:
    """Pre- and post-processing parameters: the bundle's settings (:class:`SpineBmdSettings`) and bone window."""

    image_size: int = 512
    in_channels: int = 3
    window_center: float = BONE_WINDOW_CENTER
    window_width: float = BONE_WINDOW_WIDTH
    min_slices: int = 20
    slices_per_vertebra: int = 3
    central_fraction: float = 0.4
    cortex_hu: float = 300.0
    roi_fraction: float = 0.5
    batch_size: int = 4
    class_log_offsets: tuple[float, float, float] | None = None

    @classmethod
    def from_meta(cls, meta: Any) -> SpineParams:
        """Parameters of a bundle: its ``task_config`` settings, and the window of its input spec.

        ``input.extra`` is descriptive only (bundles written before the settings were defined once
        carry a copy there; it is not read).

        Raises
        ------
        BundleError
            If the bundle's settings do not validate (e.g. class offsets that are not three finite numbers).
        """
        params = settings_of(meta, SpineBmdSettings).params()
        if meta.input.window is not None:
            params = replace(params, window_center=meta.input.window[0], window_width=meta.input.window[1])
        return params


def prepare_slice(hu_slice: np.ndarray, params: SpineParams) -> tuple[np.ndarray, float]:
    """Bone-windowed slice in [0, 1], resized to ``image_size`` along its longer side; and the scale factor.

    The same function prepares training slices, so serving and training agree.
    """
    img = bone_window(np.asarray(hu_slice, dtype=np.float32), params.window_center, params.window_width)
    scale = float(params.image_size) / float(max(img.shape))
    if abs(scale - 1.0) > 1e-6:
        img = ndimage.zoom(img, scale, order=1, grid_mode=True, mode="nearest")
    return np.clip(img, 0.0, 1.0).astype(np.float32), scale


def _to_tensor(img: np.ndarray, channels: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img))[None]
    return t.expand(channels, -1, -1).contiguous() if channels > 1 else t


def select_series(datasets: Sequence[Dataset], min_slices: int) -> Series:
    """The CT series with the most slices, if it has at least ``min_slices`` positioned slices.

    Raises
    ------
    InvalidDatasetError
        When no CT series qualifies.
    """
    ct = [s for s in group_by_series([d for d in datasets if str(d.get("Modality", "")).upper() == "CT"]).values()
          if s.has_geometry]
    if not ct:
        raise InvalidDatasetError("spine_bmd needs an axial CT series with image position and orientation")
    series = max(ct, key=len)
    if len(series) < min_slices:
        raise InvalidDatasetError(f"spine_bmd needs at least {min_slices} slices, the CT series has {len(series)}")
    return series


def anterior_is_up(series: Series) -> bool:
    """Whether anterior lies towards row 0 (the column direction cosine points posterior, +y in LPS)."""
    return bool(series.affine[1, 1] >= 0)


def slice_positions(series: Series) -> np.ndarray:
    """Position of every slice along the stack normal (mm), ascending in stack order."""
    step = series.affine[:3, 0]
    norm = float(np.linalg.norm(step)) or 1.0
    normal = step / norm
    origin = float(np.dot(series.affine[:3, 3], normal))
    return origin + norm * np.arange(len(series), dtype=float)


@dataclass
class SpineAnalysis:
    """Result of :func:`analyze_volume`: geometry, reported vertebrae and the patient-level class."""

    geometry: SpineGeometry
    vertebrae: list[VertebraResult]
    patient: tuple[int, float] | None
    detector_slices: list[int] = field(default_factory=list)
    missing_levels: list[str] = field(default_factory=list)


def _region(geom: SpineGeometry, spacing: tuple[float, float], shape: tuple[int, int],
            margin_mm: float = 25.0, half_width_mm: float = 45.0) -> tuple[float, float, float, float]:
    """Where a body's box centre may lie on an axial slice (x0, y0, x1, y1), from the profile pass."""
    r0, r1 = geom.ap_rows
    my, mx = margin_mm / spacing[0], half_width_mm / spacing[1]
    return (max(0.0, geom.column - mx), max(0.0, r0 - my), min(shape[1] - 1.0, geom.column + mx),
            min(shape[0] - 1.0, r1 + my))


def analyze_volume(
    model: torch.nn.Module,
    device: torch.device | str,
    volume_hu: np.ndarray,
    positions: np.ndarray,
    pixel_spacing: tuple[float, float],
    params: SpineParams,
    timer: StageTimer | None = None,
    *,
    anterior_up: bool = True,
) -> SpineAnalysis:
    """Levels, detector on the mid-body slices, per-vertebra classes and HU, patient class.

    Used by the task and by training's study-level evaluation, so both measure the same pipeline.
    """
    timer = timer or StageTimer()
    with timer.stage("levels"):
        geom = find_levels(volume_hu, positions, pixel_spacing, cortex_hu=params.cortex_hu, anterior_up=anterior_up)
        wanted = [r for r in geom.runs if r.name in REPORTED_LEVELS]
        picks = {r.name: select_slices(r, positions, central_fraction=params.central_fraction,
                                       count=params.slices_per_vertebra) for r in wanted}
        order = sorted({i for v in picks.values() for i in v})
    detections: dict[int, Any] = {}
    if order:
        with timer.stage("preprocess"):
            prepared = [prepare_slice(volume_hu[i], params) for i in order]
            tensors = [_to_tensor(img, params.in_channels) for img, _ in prepared]
        with timer.stage("forward"):
            outs = run_batched(model, tensors, params.batch_size, device)
        with timer.stage("postprocess"):
            region = _region(geom, pixel_spacing, volume_hu.shape[1:])
            for i, (_, scale), out in zip(order, prepared, outs, strict=True):  # type: ignore[arg-type]
                boxes = out["boxes"].float().numpy() / scale
                detections[i] = slice_class_scores(boxes, out["labels"].numpy(), out["scores"].float().numpy(),
                                                   slice_index=i, region=region)
    vertebrae: list[VertebraResult] = []
    with timer.stage("postprocess"):
        for run in wanted:
            res = aggregate_vertebra(run, [detections[i] for i in picks[run.name] if detections.get(i) is not None],
                                     params.class_log_offsets)
            if res is None:
                log.warning("no vertebral body detected at %s", run.name)
                continue
            try:
                stats = [trabecular_roi(volume_hu[d], res.box, fraction=params.roi_fraction) for d in res.slices]
                n = sum(s.n_voxels for s in stats)
                res.mean_hu = float(sum(s.mean_hu * s.n_voxels for s in stats) / n)
            except ValueError as exc:
                log.warning("trabecular ROI of %s: %s", run.name, exc)
            vertebrae.append(res)
    found = {v.level for v in vertebrae}
    missing = [lv for lv in REPORTED_LEVELS if lv not in found]
    patient = patient_class(vertebrae) if vertebrae else None
    return SpineAnalysis(geom, sorted(vertebrae, key=lambda v: v.level), patient, order, missing)


# --------------------------------------------------------------------------- findings


def _overlay(series: Series, volume_hu: np.ndarray, positions: np.ndarray, analysis: SpineAnalysis,
             refs: list[ImageRef], boxes: list[Box], params: SpineParams) -> Overlay:
    spacing = (float(series.spacing[1]), float(series.spacing[2]))
    geom = analysis.geometry
    windowed = bone_window(volume_hu[:, :, max(0, geom.column - 2):geom.column + 3], params.window_center,
                           params.window_width)
    sag = sagittal_reformat(windowed, positions, spacing, column=min(2, geom.column), slab=5)
    sag_boxes: list[Box] = []
    for v, b in zip(analysis.vertebrae, boxes, strict=True):
        rows = sag.slice_to_row(np.array([v.run.i1 + 0.5, v.run.i0 - 0.5]))
        y0, y1 = float(np.clip(min(rows), 0, sag.image.shape[0] - 1)), float(np.clip(max(rows), 0, sag.image.shape[0] - 1))
        x0, x1 = float(v.box[1] * spacing[0] / sag.spacing[1]), float(v.box[3] * spacing[0] / sag.spacing[1])
        if y1 > y0 and x1 > x0:
            sag_boxes.append(Box(b.image, x0, y0, x1, y1, b.label, b.score, finding_site=b.finding_site,
                                 text=f"{v.level} {v.class_name}"))
    caption = "Sagittal reformat: " + ", ".join(f"{v.level} {v.class_name}" for v in analysis.vertebrae)
    panels = [Panel(pixels=np.clip(sag.image, 0, 1), caption=caption, boxes=sag_boxes)]
    for v, b in zip(analysis.vertebrae, boxes, strict=True):
        panels.append(Panel(image=refs[v.slice_index], caption=level_statement(v), boxes=[b]))
    return Overlay(panels=panels, title="Lumbar spine BMD class per vertebra (L1-L4)",
                   derived_from=tuple(refs[v.slice_index] for v in analysis.vertebrae))


def _not_most_probable(v: VertebraResult) -> bool:
    return int(np.argmax(v.probs)) != v.class_index


def level_statement(v: VertebraResult) -> str:
    """One vertebra's class, e.g. ``"L2 osteopenia (p=0.62; 118 HU)"``.

    When the operating point (the bundle's class offsets) chose a class that is
    not the most probable one, the most probable class is named too:
    ``"L2 osteopenia (p=0.27, normal p=0.70; 164 HU)"``.
    """
    text = f"p={v.probability:.2f}"
    if _not_most_probable(v):
        top = int(np.argmax(v.probs))
        text += f", {CLASS_NAMES[top]} p={float(v.probs[top]):.2f}"
    if v.mean_hu is not None:
        text += f"; {v.mean_hu:.0f} HU"
    return f"{v.level} {v.class_name} ({text})"


def _refs(series: Series) -> list[ImageRef]:
    return [ImageRef(str(p.ds.SOPInstanceUID), None if p.frame is None else p.frame + 1) for p in series.planes]


def build_findings(series: Series, volume_hu: np.ndarray, positions: np.ndarray, analysis: SpineAnalysis,
                   meta: Any, params: SpineParams, timings: dict[str, float]) -> Findings:
    """Findings of one analysed study (see the module docstring for their content)."""
    refs = _refs(series)
    classifications: list[Classification] = []
    boxes: list[Box] = []
    for v in analysis.vertebrae:
        site = codes.LUMBAR_VERTEBRAE[v.level]
        value = CLASS_CODES[v.class_index]
        meas = [] if v.mean_hu is None else [Measurement(MEAN_TRABECULAR_HU, round(v.mean_hu, 1), HU_UNIT,
                                                         finding_site=site, derivation=codes.MEAN)]
        x0, y0, x1, y1 = v.box
        boxes.append(Box(refs[v.slice_index], x0, y0, x1, y1, value, v.probability, finding_site=site,
                         tracking_id=f"{v.level} vertebral body", measurements=list(meas),
                         text=f"{v.level} {v.class_name} {v.probability:.2f}"))
        classifications.append(Classification(codes.FINDING, value, probability=v.probability, finding_site=site,
                                              images=(refs[v.slice_index],), measurements=meas,
                                              tracking_id=f"{v.level} classification"))
    summary_parts = [level_statement(v) for v in analysis.vertebrae]
    if analysis.patient is not None:
        idx, conf = analysis.patient
        classifications.append(Classification(codes.FINDING, CLASS_CODES[idx], probability=conf,
                                              finding_site=codes.LUMBAR_SPINE, tracking_id="patient-level class"))
        summary_parts.insert(0, f"Patient: {CLASS_NAMES[idx]} (p={conf:.2f}, most severe of L1-L4)")
    if analysis.missing_levels:
        summary_parts.append("not assessed: " + ", ".join(analysis.missing_levels))
    if any(_not_most_probable(v) for v in analysis.vertebrae):
        summary_parts.append("classes decided at the validated operating point (class offsets), "
                             "not always the most probable class")
    overlays = [_overlay(series, volume_hu, positions, analysis, refs, boxes, params)] if analysis.vertebrae else []
    return Findings(
        task=NAME, algorithm_name=meta.algorithm_name, algorithm_version=meta.version,
        study_instance_uid=str(series.planes[0].ds.StudyInstanceUID), source_images=image_refs(series.datasets),
        classifications=classifications, boxes=boxes, overlays=overlays, summary=statement(*summary_parts),
        synthetic_model=bool(meta.synthetic_only), timings_s=dict(timings),
    )


def spine_bmd(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Run the task on one study's datasets.

    Raises
    ------
    InvalidDatasetError
        No suitable CT series.
    TaskError
        No lumbar vertebra could be found or classified.
    """
    timer = StageTimer()
    with timer.stage("load"):
        loaded = model_for(NAME, context)
        params = SpineParams.from_meta(loaded.meta)
        series = select_series(datasets, params.min_slices)
        volume = series.volume()
        positions = slice_positions(series)
    spacing = (float(series.spacing[1]), float(series.spacing[2]))
    analysis = analyze_volume(loaded.model, loaded.device, volume, positions, spacing, params, timer,
                              anterior_up=anterior_is_up(series))
    if not analysis.vertebrae:
        raise TaskError("spine_bmd: no lumbar vertebral body (L1-L4) was found in the CT series")
    log.info("spine_bmd: %d vertebrae classified, detector on %d of %d slices (%s)", len(analysis.vertebrae),
             len(analysis.detector_slices), len(series), timer.log_line())
    with timer.stage("findings"):
        findings = build_findings(series, volume, positions, analysis, loaded.meta, params, timer.seconds)
    findings.timings_s.update(timer.seconds)
    return findings


register_task(NAME, spine_bmd)
