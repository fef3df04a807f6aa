"""Task ``wrist_fracture``: adult wrist radiographs (DX/CR), fracture yes/no per study.

Pipeline (spec ``wrist_fracture.md``, thesis section 4.2):

1. load: the bundle (pinned or current) and the study's radiographs, ordered by
   Instance Number.
2. preprocess: :mod:`inference.radiograph` - DICOM pixel pipeline with header
   inversion (corner-mean fallback only for unreliable headers), anatomic-part
   splitter (each large component its own sample), rotation alignment with the
   fingers up, letterbox 2:3 to 341x512, normalisation.
3. forward: ResNet18, one logit per part, sigmoid.
4. Grad-CAM on the last conv block of every part, mapped back to the *source*
   pixels through each part's inverse transform.
5. postprocess: image probability = max over its parts; study probability = max
   over its images ("at least one", ALO); the study is positive when that
   probability reaches the bundle's threshold (``task_config.threshold``).

Findings: one study-level classification (Fracture present/absent, probability,
finding site wrist with laterality), one classification per image referencing
it, and one overlay per image with the heat map and the probability.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydicom import Dataset

from inference.codes import BILATERAL, LEFT, RIGHT, WRIST
from inference.errors import TaskError
from inference.findings import (
    ABSENT,
    FRACTURE,
    PRESENT,
    Classification,
    Code,
    Findings,
    ImageRef,
    Overlay,
    Panel,
    decision_text,
    statement,
)
from inference.nets.resnet import gradcam
from inference.radiograph import (
    PreparedImage,
    prepare,
    split_parts,
    to_float,
)
from inference.runtime import StageTimer, run_batched
from inference.task_settings import WristFractureSettings, settings_of
from inference.tasks import TaskContext, register_task
from inference.tasks.base import model_for

log = logging.getLogger(__name__)

NAME = "wrist_fracture"
DEFAULT_THRESHOLD = 0.5
MAX_BATCH = 16
OVERLAY_TITLE = "Wrist fracture: Grad-CAM map of where the model looked (shown for every result)"

__all__ = ["NAME", "ImageResult", "image_laterality", "run_wrist_fracture", "study_laterality", "study_probability"]


@dataclass
class ImageResult:
    """Model output for one source image: its probability (max over parts) and heat map in source pixels."""

    ref: ImageRef
    probability: float
    heatmap: np.ndarray
    n_parts: int
    laterality: Code | None = None


def image_laterality(ds: Dataset) -> Code | None:
    """Laterality of one image from ImageLaterality, else (series) Laterality; None when absent/unknown."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R", "B"):
            return {"L": LEFT, "R": RIGHT, "B": BILATERAL}[value]
    return None


def study_laterality(codes: Sequence[Code | None]) -> Code | None:
    """One laterality for the study: the images' common side, Bilateral when they disagree, None if unknown."""
    known = {c for c in codes if c is not None}
    if not known:
        return None
    if len(known) == 1:
        return known.pop()
    return BILATERAL


def study_probability(image_probs: Sequence[float], how: str = "alo", threshold: float = DEFAULT_THRESHOLD) -> float:
    """Study score from image probabilities.

    ``"alo"`` ("at least one"): the maximum, so the study is positive when any
    image reaches the threshold. ``"majority"``: the fraction of images at or
    above ``threshold`` (the study is positive when it exceeds 0.5).
    """
    p = np.asarray(image_probs, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no image probabilities")
    if how == "alo":
        return float(p.max())
    if how == "majority":
        return float(np.mean(p >= threshold))
    raise ValueError(f"unknown study aggregation {how!r}")


def _is_radiograph(ds: Dataset) -> bool:
    return "PixelData" in ds and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("Rows", 0) or 0) > 0


def _ordered(datasets: Sequence[Dataset]) -> list[Dataset]:
    def key(ds: Dataset) -> tuple[int, str]:
        try:
            number = int(ds.get("InstanceNumber", 0) or 0)
        except (TypeError, ValueError):
            number = 0
        return number, str(ds.SOPInstanceUID)

    return sorted(datasets, key=key)


def _parts(ds: Dataset, settings: WristFractureSettings) -> list[PreparedImage]:
    """The model inputs of one image, with the pre-processing parameters the bundle was trained with."""
    image = to_float(ds)
    rows, cols = image.shape
    if settings.split_parts:
        boxes = [p.bbox for p in split_parts(image, min_share=settings.min_part_share)]
    else:
        boxes = [(0, 0, cols, rows)]
    return [prepare(image, bbox=b, align=settings.align, out_hw=settings.input_hw,
                    mean=settings.mean, std=settings.std) for b in boxes]


def _cams(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """Grad-CAM maps (N, H, W) in [0, 1] for a CPU batch, computed in micro-batches on ``device``."""
    out = []
    for i in range(0, len(x), MAX_BATCH):
        out.append(gradcam(model, x[i:i + MAX_BATCH].to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,) + tuple(x.shape[-2:]), np.float32)


def run_wrist_fracture(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Run the wrist fracture model on one study's radiographs.

    Raises
    ------
    TaskError
        If the study holds no single-channel image to analyse.
    """
    timer = StageTimer()
    with timer.stage("model_load"):
        loaded = model_for(NAME, context)
        settings = settings_of(loaded.meta, WristFractureSettings)
        threshold = settings.threshold
        images = _ordered([ds for ds in datasets if _is_radiograph(ds)])
        if not images:
            raise TaskError("wrist_fracture: the study has no single-channel radiograph to analyse")
    with timer.stage("preprocess"):
        prepared: list[list[PreparedImage]] = [_parts(ds, settings) for ds in images]
        flat = [p for parts in prepared for p in parts]
        x = torch.stack([p.tensor for p in flat])
    model = loaded.model
    model.eval()
    with timer.stage("forward"):
        logits = run_batched(model, x, MAX_BATCH, loaded.device)
        probs = torch.sigmoid(torch.as_tensor(logits).float()[:, 0]).numpy()
    with timer.stage("gradcam"):
        cams = _cams(model, x, loaded.device)
    with timer.stage("postprocess"):
        results: list[ImageResult] = []
        k = 0
        for ds, parts in zip(images, prepared, strict=True):
            rows, cols = int(ds.Rows), int(ds.Columns)
            heat = np.zeros((rows, cols), np.float32)
            part_probs = []
            for part in parts:
                p = float(probs[k])
                # each part's map is weighted by its probability so the likeliest part dominates the image
                heat = np.maximum(heat, part.map_to_source(cams[k]) * p)
                part_probs.append(p)
                k += 1
            peak = float(heat.max())
            if peak > 0:
                heat /= peak
            results.append(ImageResult(ImageRef(str(ds.SOPInstanceUID)), max(part_probs), heat, len(parts),
                                       image_laterality(ds)))
        findings = _findings(images, results, loaded, threshold)
    findings.timings_s.update(timer.seconds)
    log.info("wrist_fracture: %d image(s), %d part(s), study probability %.3f (%s)", len(images), len(flat),
             findings.classifications[0].probability, timer.log_line())
    return findings


def image_statement(p: float, threshold: float) -> str:
    """The decision on one probability with its operating point, e.g. ``"p=0.73 < 0.81: no fracture detected"``."""
    return decision_text(p, threshold, "fracture suspected", "no fracture detected")


def _value(p: float, threshold: float) -> Code:
    return PRESENT if p >= threshold else ABSENT


def _findings(images: Sequence[Dataset], results: Sequence[ImageResult], loaded: object, threshold: float) -> Findings:
    meta = loaded.meta  # type: ignore[attr-defined]
    p_study = study_probability([r.probability for r in results], "alo")
    laterality = study_laterality([r.laterality for r in results])
    classifications = [Classification(FRACTURE, _value(p_study, threshold), probability=p_study, finding_site=WRIST,
                                      laterality=laterality, tracking_id="wrist fracture study", threshold=threshold)]
    overlays = []
    n = len(results)
    for i, r in enumerate(results, start=1):
        classifications.append(Classification(FRACTURE, _value(r.probability, threshold), probability=r.probability,
                                              finding_site=WRIST, laterality=r.laterality, images=(r.ref,),
                                              tracking_id=f"wrist fracture image {i}", threshold=threshold))
        overlays.append(Overlay(
            panels=[Panel(image=r.ref, heatmap=r.heatmap, caption=f"Image {i} of {n}: " + image_statement(
                r.probability, threshold))],
            title=f"{OVERLAY_TITLE}, image {i} of {n}", derived_from=(r.ref,)))
    summary = statement(image_statement(p_study, threshold), f"study p is the highest of {n} images" if n > 1 else "")
    return Findings(
        task=NAME, algorithm_name=meta.algorithm_name, algorithm_version=meta.version,
        study_instance_uid=str(images[0].StudyInstanceUID), source_images=tuple(r.ref for r in results),
        classifications=classifications, overlays=overlays, summary=summary, synthetic_model=meta.synthetic_only,
    )


register_task(NAME, run_wrist_fracture)
