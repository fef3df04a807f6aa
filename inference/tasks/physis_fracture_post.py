"""Post-processing of the physis fracture detector and the two-stage combination rule.

Pure numpy functions, shared by inference (:mod:`inference.tasks.physis_fracture`)
and evaluation (``training.tasks.physis_fracture``), so both score images the
same way. The rules, in order, for one image:

1. **Class filter and score threshold.** Detections are (box, label, score) in
   source pixels with labels 1 = fracture, 2 = metal, 3 = text (0 = background
   never appears). Detections below ``det_score_thresh`` are dropped.
2. **Per-class NMS** with IoU ``nms_iou`` (torchvision already runs one inside
   the detector; repeating it makes the rule independent of the detector's
   own settings).
3. **Distractor suppression.** A fracture box is dropped when at least
   ``distractor_overlap`` of its area lies inside a metal or text box whose
   score is at least the fracture box's score. Metal and text boxes are never
   reported and never become fractures: only label 1 survives this step.
4. **Top-k.** The ``top_k`` highest-scoring fracture boxes are kept.
5. **Crops.** Each kept box grows by ``crop_margin`` of its width/height on
   every side (at least ``crop_min_side`` px), clipped to the image, and is
   cropped from the full-resolution source image
   (:func:`inference.radiograph.crop_with_margin`).
6. **Combination rule.** A box's combined score is the geometric mean of the
   detector score and the crop classifier's probability,
   ``r_i = sqrt(s_i * c_i)``; the image score is ``max_i r_i``. With no box
   left after step 4 the image score is the whole-image classifier's
   probability. (Detector-only baseline: ``max_i s_i``, 0 with no box;
   classifier baseline: the whole-image probability.)
7. **Reporting.** The image is positive when its score is at least
   ``threshold``. Boxes with a combined score of at least ``box_report_thresh``
   are reported (as TID 1410 planar ROIs and on the overlay).

Salter-Harris typing is out of scope (no labels): :data:`SALTER_HARRIS_FIELD`
names the slot a future typing head fills; it stays ``None``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from inference import boxes as boxes_ops

__all__ = [
    "FRACTURE_LABEL", "LABEL_NAMES", "METAL_LABEL", "SALTER_HARRIS_FIELD", "TEXT_LABEL", "BoxCandidate",
    "ImageScore", "PostConfig", "combine", "covered_fraction", "detector_only_score", "filter_detections",
    "nms", "select_fracture_boxes",
]

FRACTURE_LABEL = 1
METAL_LABEL = 2
TEXT_LABEL = 3
LABEL_NAMES = {FRACTURE_LABEL: "fracture", METAL_LABEL: "metal", TEXT_LABEL: "text"}
DISTRACTOR_LABELS = (METAL_LABEL, TEXT_LABEL)
SALTER_HARRIS_FIELD = "salter_harris_type"


@dataclass(frozen=True)
class PostConfig:
    """Thresholds of the post-processing rules.

    A bundle sets them through its task settings (``task_config.post`` and ``operating_threshold`` of
    :class:`inference.task_settings.PhysisFractureSettings`); a bad value raises ValueError, so such a
    bundle fails when it loads.
    """

    det_score_thresh: float = 0.2
    nms_iou: float = 0.5
    distractor_overlap: float = 0.5
    top_k: int = 3
    crop_margin: float = 0.25
    crop_min_side: int = 32
    threshold: float = 0.5
    box_report_thresh: float = 0.5

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool)

        unit = ("det_score_thresh", "nms_iou", "distractor_overlap", "threshold", "box_report_thresh")
        problems = [f"{name} must be a number in [0, 1], got {getattr(self, name)!r}" for name in unit
                    if not (number(getattr(self, name)) and 0.0 <= getattr(self, name) <= 1.0)]
        problems += [f"{name} must be an integer >= 1, got {getattr(self, name)!r}" for name in ("top_k", "crop_min_side")
                     if not (isinstance(getattr(self, name), int) and number(getattr(self, name))
                             and getattr(self, name) >= 1)]
        if not (number(self.crop_margin) and 0.0 <= self.crop_margin <= 2.0):
            problems.append(f"crop_margin must be a number in [0, 2], got {self.crop_margin!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> PostConfig:
        """Build from a (possibly partial) dict; unknown keys raise ValueError."""
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown post-processing keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


@dataclass
class BoxCandidate:
    """One fracture box after post-processing, in source pixels (x = column, y = row)."""

    box: tuple[float, float, float, float]
    det_score: float
    crop_prob: float | None = None
    salter_harris_type: str | None = None  # out of scope: never set by this model

    @property
    def score(self) -> float:
        """Combined score ``sqrt(det_score * crop_prob)``; the detector score without a crop classifier."""
        if self.crop_prob is None:
            return float(self.det_score)
        return math.sqrt(max(0.0, float(self.det_score)) * max(0.0, float(self.crop_prob)))


@dataclass
class ImageScore:
    """Scores of one image under every method the model can run."""

    score: float
    method: str
    boxes: list[BoxCandidate] = field(default_factory=list)
    image_prob: float | None = None
    detector_score: float | None = None
    two_stage_score: float | None = None
    used_fallback: bool = False
    detections: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # raw (boxes, labels, scores), source px

    def by_method(self) -> dict[str, float]:
        """{method: image score} for the methods that were computed."""
        out = {}
        if self.two_stage_score is not None:
            out["two_stage"] = self.two_stage_score
        if self.image_prob is not None:
            out["classifier"] = self.image_prob
        if self.detector_score is not None:
            out["detector"] = self.detector_score
        return out


def _as_boxes(boxes: Any) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas of (N, 4) boxes (x0, y0, x1, y1), zero for degenerate ones."""
    b = _as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    return np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)


def iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) (:func:`torchvision.ops.box_iou`)."""
    return boxes_ops.box_iou(a, b)


def covered_fraction(a: Any, b: Any) -> np.ndarray:
    """(N, M): fraction of each box in ``a`` covered by each box in ``b``."""
    a, b = _as_boxes(a), _as_boxes(b)
    inter = _intersection(a, b)
    area = box_area(a)[:, None]
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)


def nms(boxes: Any, scores: Any, iou_thr: float) -> np.ndarray:
    """Greedy non-maximum suppression (:func:`torchvision.ops.nms`); indices kept, by descending score (ties: lower
    index first)."""
    return boxes_ops.nms(boxes, scores, iou_thr)


def filter_detections(boxes: Any, labels: Any, scores: Any, cfg: PostConfig) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """Rules 1-2: drop low scores and unknown labels, then per-class NMS. Returns (boxes, labels, scores)."""
    b = _as_boxes(boxes)
    lab = np.asarray(labels, dtype=np.int64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    ok = (s >= cfg.det_score_thresh) & np.isin(lab, list(LABEL_NAMES)) & (box_area(b) > 0)
    b, lab, s = b[ok], lab[ok], s[ok]
    keep: list[int] = []
    for c in np.unique(lab):
        idx = np.nonzero(lab == c)[0]
        keep.extend(int(idx[k]) for k in nms(b[idx], s[idx], cfg.nms_iou))
    keep_arr = np.asarray(sorted(keep, key=lambda i: (-s[i], i)), dtype=np.int64)
    return b[keep_arr], lab[keep_arr], s[keep_arr]


def select_fracture_boxes(boxes: Any, labels: Any, scores: Any, cfg: PostConfig) -> list[BoxCandidate]:
    """Rules 1-4: the fracture boxes that go on to the crop classifier (metal/text never do)."""
    b, lab, s = filter_detections(boxes, labels, scores, cfg)
    frac = np.nonzero(lab == FRACTURE_LABEL)[0]
    dist = np.nonzero(np.isin(lab, DISTRACTOR_LABELS))[0]
    kept: list[BoxCandidate] = []
    cover = covered_fraction(b[frac], b[dist]) if len(frac) and len(dist) else np.zeros((len(frac), 0))
    for row, i in enumerate(frac):
        blockers = [j for col, j in enumerate(dist) if cover[row, col] >= cfg.distractor_overlap and s[j] >= s[i]]
        if blockers:
            continue
        kept.append(BoxCandidate(tuple(float(v) for v in b[i]), float(s[i])))
        if len(kept) >= cfg.top_k:
            break
    return kept


def detector_only_score(candidates: list[BoxCandidate]) -> float:
    """Detector baseline: the top fracture box's detector score (0 with none)."""
    return max((c.det_score for c in candidates), default=0.0)


def combine(candidates: list[BoxCandidate], image_prob: float | None, *, method: str = "two_stage") -> ImageScore:
    """Rule 6: the image score of ``method`` from the scored candidates and the whole-image probability.

    ``candidates`` carry ``crop_prob`` for the two-stage method. With
    ``method="two_stage"`` the detector-only and classifier scores are filled
    in too when available, so one pass scores all methods.
    """
    det = detector_only_score(candidates) if method in ("two_stage", "detector") else None
    if method == "classifier":
        if image_prob is None:
            raise ValueError("the classifier method needs the whole-image probability")
        return ImageScore(float(image_prob), method, [], image_prob=float(image_prob))
    if method == "detector":
        return ImageScore(float(det or 0.0), method, list(candidates), detector_score=det)
    if method != "two_stage":
        raise ValueError(f"unknown method {method!r}")
    if any(c.crop_prob is None for c in candidates):
        raise ValueError("two-stage candidates need a crop probability")
    if candidates:
        two = max(c.score for c in candidates)
        fallback = False
    else:
        if image_prob is None:
            raise ValueError("with no detection the two-stage method needs the whole-image probability")
        two, fallback = float(image_prob), True
    return ImageScore(float(two), method, sorted(candidates, key=lambda c: -c.score),
                      image_prob=None if image_prob is None else float(image_prob), detector_score=det,
                      two_stage_score=float(two), used_fallback=fallback)


def reported_boxes(result: ImageScore, cfg: PostConfig) -> list[BoxCandidate]:
    """Rule 7: the fracture boxes to report (combined score >= ``box_report_thresh``)."""
    return [c for c in result.boxes if c.score >= cfg.box_report_thresh]
