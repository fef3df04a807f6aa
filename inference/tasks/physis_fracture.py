"""Task ``physis_fracture``: paediatric growth-plate fractures on DX/CR radiographs.

Pipeline per image (``tasks/physis_fracture.md``):

1. load: :func:`inference.radiograph.to_float` (the pixel pipeline shared with
   ``wrist_fracture``), bone bright in [0, 1];
2. preprocess: letterbox with black padding to a square of ``det_long_side``
   (>= 1024 faithful, never cropping beyond the collimation) for the detector
   and to ``image_size`` for the whole-image classifier;
3. model: the bundle's :class:`~inference.nets.physis_two_stage.PhysisTwoStage`
   (detector proposes fracture/metal/text boxes; the kept fracture boxes are
   cropped *from the full-resolution source* with a margin for the crop classifier);
4. postprocess: :mod:`inference.tasks.physis_fracture_post` (threshold, NMS,
   distractor suppression, top-k, combination rule) with the rules of the bundle's
   task settings (:meth:`~inference.task_settings.PhysisFractureSettings.post_config`:
   ``task_config.post`` and the tuned ``operating_threshold``), the class training uses.

Findings: one image-level classification per image (growth-plate fracture
present/absent with its probability) plus a study-level one (maximum over
images), each reported fracture region (post-processing rule 7 *and* a score at
or above the operating point, so a negative image carries no fracture region)
as a :class:`Box` (a TID 1410 planar ROI on its source image) with its score,
and one overlay per image with the boxes drawn. Every statement names the
operating point ("p=0.73 < 0.81: no growth-plate fracture detected"); the
summary is the study's. Metal and text detections are never reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydicom import Dataset

from inference import codes
from inference.errors import TaskError
from inference.findings import (
    ABSENT,
    PRESENT,
    Box,
    Classification,
    Findings,
    ImageRef,
    Overlay,
    Panel,
    counted,
    decision_text,
    statement,
)
from inference.radiograph import apply_affine, crop_with_margin, detector_input, to_float
from inference.runtime import StageTimer
from inference.task_settings import PhysisFractureSettings, settings_of
from inference.tasks import TaskContext, register_task
from inference.tasks.base import model_for
from inference.tasks.physis_fracture_post import (
    BoxCandidate,
    ImageScore,
    PostConfig,
    combine,
    reported_boxes,
    select_fracture_boxes,
)

log = logging.getLogger(__name__)

__all__ = ["TASK", "ImageInputs", "detect", "image_inputs", "run_physis_fracture", "score_image"]

TASK = "physis_fracture"
_IMAGE_MODALITIES = {"DX", "CR", "RG", "OT", ""}
_LATERALITY = {"L": codes.LEFT, "R": codes.RIGHT, "B": codes.BILATERAL}


@dataclass
class ImageInputs:
    """The network inputs of one image and how the detector input maps back to the source."""

    det: torch.Tensor  # (1, L, L) in [0, 1] (torchvision normalises inside the detector)
    det_to_source: np.ndarray  # 3x3
    image: torch.Tensor  # (1, S, S) normalised for the whole-image classifier
    source_shape: tuple[int, int] | None = None  # (rows, cols): detections are clipped to the source image


def image_inputs(image: np.ndarray, det_long_side: int, image_size: int) -> ImageInputs:
    """Letterbox ``image`` (float, [0, 1]) for the detector and the whole-image classifier."""
    det = detector_input(image, long_side=det_long_side)
    cls = detector_input(image, long_side=image_size)
    det_pixels = (det.tensor * det.std + det.mean).clamp_(0.0, 1.0)
    return ImageInputs(det_pixels, np.linalg.inv(det.source_to_model), cls.tensor, tuple(image.shape[:2]))


def detect(model: torch.nn.Module, det: torch.Tensor, det_to_source: np.ndarray, device: torch.device,
           source_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the detector on one letterboxed image; boxes come back in source pixels (clipped to the image).

    A box that lies entirely in the letterbox padding is dropped.
    """
    out = model.detector([det.to(device)])[0]
    boxes = out["boxes"].float().cpu().numpy().reshape(-1, 4)
    if len(boxes):
        corners = apply_affine(det_to_source, boxes.reshape(-1, 2)).reshape(-1, 4)
        boxes = np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]), np.maximum(corners[:, :2], corners[:, 2:])],
                               axis=1)
    labels, scores = out["labels"].cpu().numpy(), out["scores"].float().cpu().numpy()
    if source_shape is not None and len(boxes):
        rows, cols = source_shape
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], -0.5, cols - 0.5)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], -0.5, rows - 0.5)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
    return boxes, labels, scores


def _sigmoid(logits: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(logits.float()[:, 0]).cpu().numpy().astype(np.float64)


@torch.inference_mode()
def score_image(model: torch.nn.Module, image: np.ndarray | Callable[[], np.ndarray], device: torch.device | str = "cpu",
                post: PostConfig | None = None, timer: StageTimer | None = None,
                inputs: ImageInputs | None = None) -> ImageScore:
    """All method scores of one [0, 1] radiograph (source resolution) under ``model``'s method.

    Parameters
    ----------
    model:
        A :class:`~inference.nets.physis_two_stage.PhysisTwoStage` in eval mode.
    post:
        Post-processing rules; default :class:`PostConfig` (the task serves the bundle's settings,
        ``PhysisFractureSettings.post_config()``).
    image:
        The source radiograph, or a callable returning it (read only if crops are needed).
    inputs:
        Pre-computed :func:`image_inputs` (evaluation re-uses the cached ones).
    """
    device = torch.device(device)
    post = post or PostConfig()
    timer = timer or StageTimer()
    dtype = next(model.parameters()).dtype
    with timer.stage("preprocess"):
        if callable(image) and inputs is None:
            image = image()
        if inputs is None:
            inputs = image_inputs(image, model.det_long_side, model.image_size)
    image_prob = None
    candidates: list[BoxCandidate] = []
    with timer.stage("forward"):
        if model.image_classifier is not None:
            image_prob = float(_sigmoid(model.image_classifier(inputs.image[None].to(device, dtype)))[0])
        if model.detector is not None:
            boxes, labels, scores = detect(model, inputs.det.to(dtype), inputs.det_to_source, device,
                                           inputs.source_shape)
    with timer.stage("postprocess"):
        if model.detector is not None:
            candidates = select_fracture_boxes(boxes, labels, scores, post)
    if model.crop_classifier is not None and candidates:
        with timer.stage("preprocess"):
            if callable(image):
                image = image()
            crops = torch.stack([crop_with_margin(image, c.box, margin=post.crop_margin, min_side=post.crop_min_side,
                                                  out_size=model.crop_size).tensor for c in candidates])
        with timer.stage("forward"):
            probs = _sigmoid(model.crop_classifier(crops.to(device, dtype)))
        for c, p in zip(candidates, probs, strict=True):
            c.crop_prob = float(p)
    with timer.stage("postprocess"):
        result = combine(candidates, image_prob, method=model.method)
    if model.detector is not None:
        result.detections = (boxes, labels, scores)
    return result


def _is_image(ds: Dataset) -> bool:
    return "PixelData" in ds and str(ds.get("Modality", "")).upper() in _IMAGE_MODALITIES and int(
        ds.get("SamplesPerPixel", 1)) == 1


OVERLAY_TITLE = "Growth-plate (physis) fracture detection"


def image_statement(p: float, threshold: float) -> str:
    """The decision on one probability with its operating point, e.g. ``"p=0.73 < 0.81: no fracture detected"``."""
    return decision_text(p, threshold, "growth-plate fracture suspected", "no growth-plate fracture detected")


def _overlay(ref: ImageRef, boxes: list[Box], score: ImageScore, threshold: float, index: int, n: int) -> Overlay:
    caption = f"Image {index} of {n}: {image_statement(score.score, threshold)}"
    if score.used_fallback:
        caption += " (whole-image classifier: no candidate region)"
    elif boxes:
        caption += f", {counted(len(boxes), 'region')} marked"
    return Overlay(panels=[Panel(image=ref, caption=caption, boxes=boxes)], title=f"{OVERLAY_TITLE}, image {index} of {n}",
                   derived_from=(ref,))


def _fracture_boxes(result: ImageScore, post: PostConfig, ref: ImageRef) -> list[Box]:
    """The regions of one image reported as fractures, as boxes on its source image.

    A region is reported only at or above the operating point, so a negative image never shows a
    box labelled "fracture"; the writer renders ``score`` as the region's probability.
    """
    boxes = []
    for k, c in enumerate((c for c in reported_boxes(result, post) if c.score >= post.threshold), start=1):
        x0, y0, x1, y1 = c.box
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            continue
        boxes.append(Box(ref, x0, y0, x1, y1, label=codes.GROWTH_PLATE_FRACTURE, score=round(c.score, 4),
                         finding_site=codes.GROWTH_PLATE,
                         tracking_id=f"physis fracture region {ref.sop_instance_uid[-12:]}.{k}",
                         text=f"suspected fracture p={c.score:.2f}"))
    return boxes


def run_physis_fracture(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Run the physis fracture model on one study (every DX/CR image in it).

    Raises
    ------
    TaskError
        If the study has no single-channel radiograph, or the bundle is not a physis model.
    """
    timer = StageTimer()
    images = sorted((d for d in datasets if _is_image(d)), key=lambda d: (int(d.get("InstanceNumber", 0) or 0),
                                                                           str(d.SOPInstanceUID)))
    if not images:
        raise TaskError("physis_fracture: the study has no single-channel radiograph")
    with timer.stage("model_load"):
        loaded = model_for(TASK, context)
    model = loaded.model
    for attr in ("method", "det_long_side", "image_size"):
        if not hasattr(model, attr):
            raise TaskError(f"bundle {loaded.meta.architecture!r} is not a physis_two_stage model")
    post = settings_of(loaded.meta, PhysisFractureSettings).post_config()  # the bundle's task_config
    classifications: list[Classification] = []
    all_boxes: list[Box] = []
    overlays: list[Overlay] = []
    refs = tuple(ImageRef(str(d.SOPInstanceUID)) for d in images)
    study_score = 0.0
    for index, (ds, ref) in enumerate(zip(images, refs, strict=True), start=1):
        with timer.stage("load"):
            image = to_float(ds)
        result = score_image(model, image, loaded.device, post, timer)
        laterality = _LATERALITY.get(str(ds.get("ImageLaterality", "") or ds.get("Laterality", "")).upper())
        boxes = _fracture_boxes(result, post, ref)
        all_boxes.extend(boxes)
        prob = round(float(np.clip(result.score, 0.0, 1.0)), 4)
        classifications.append(Classification(
            codes.GROWTH_PLATE_FRACTURE, PRESENT if prob >= post.threshold else ABSENT, probability=prob,
            finding_site=codes.GROWTH_PLATE, laterality=laterality, images=(ref,), threshold=post.threshold,
        ))
        overlays.append(_overlay(ref, boxes, result, post.threshold, index, len(images)))
        study_score = max(study_score, prob)
    classifications.insert(0, Classification(
        codes.GROWTH_PLATE_FRACTURE, PRESENT if study_score >= post.threshold else ABSENT, probability=study_score,
        finding_site=codes.GROWTH_PLATE, threshold=post.threshold,
    ))
    n_pos = sum(1 for c in classifications[1:] if c.value == PRESENT)
    summary = statement(image_statement(study_score, post.threshold),
                        f"{n_pos} of {counted(len(images), 'image')} positive, "
                        f"{counted(len(all_boxes), 'region')} marked")
    meta = loaded.meta
    return Findings(
        task=TASK, algorithm_name=meta.algorithm_name, algorithm_version=meta.version,
        study_instance_uid=str(images[0].StudyInstanceUID), source_images=refs, classifications=classifications,
        boxes=all_boxes, overlays=overlays, summary=summary, synthetic_model=bool(meta.synthetic_only),
        timings_s={k: round(v, 4) for k, v in timer.seconds.items()},
    )


register_task(TASK, run_physis_fracture)
