"""Metrics of ``spine_bmd``: detection (standard and the DSNet paper's own), vertebra and level scores.

Standard metrics
    mAP@0.5 (VOC all-point AP per class, mean over classes with ground truth),
    per-class sensitivity, macro-F1 and Cohen's kappa of the per-vertebra class
    from the full study pipeline (the one the node runs), and the level-labelling
    accuracy: the share of studies whose L1-L4 are all named correctly.

The paper's definitions (Xue et al. 2022, Table 1; non-standard)
    "Map" = TP / (N (TP + FP)) and "Acc" = TP / (TP + TN + FN). We read them
    per class c at the box level, one class versus the rest, over ground-truth
    vertebral bodies matched at IoU >= 0.5 by the top-scoring detection:
    TP_c = body of class c predicted c, FP_c = predicted c but another class
    (or an unmatched detection), FN_c = body of class c not predicted c,
    TN_c = body of another class not predicted c. "Map" is then the mean over
    the N classes of TP_c / (TP_c + FP_c) (i.e. TP/(N(TP+FP)) summed over
    classes), Recall the mean of TP_c / (TP_c + FN_c) and "Acc" the mean of
    TP_c / (TP_c + TN_c + FN_c), exactly as printed. They are reported in %.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from training.metrics import BoxPrediction, box_iou, confusion_matrix, mean_average_precision

__all__ = ["SliceEval", "detection_metrics", "paper_metrics"]

REFERENCE_TABLE1: dict[str, tuple[float, float, float]] = {
    "resnet50": (78.2, 88.1, 74.1),
    "resnet50_se": (80.4, 88.5, 73.7),
    "resnet50_sk": (81.4, 89.2, 73.8),
    "resnet50_ds": (83.4, 90.0, 75.9),
}


@dataclass
class SliceEval:
    """Detections and ground truth of one labelled slice (boxes in the same pixel grid)."""

    image: str
    pred_boxes: np.ndarray
    pred_labels: np.ndarray  # 1-based classes
    pred_scores: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray  # 1-based classes


def paper_metrics(slices: Sequence[SliceEval], n_classes: int = 3, *, iou_thr: float = 0.5,
                  score_thr: float = 0.5) -> dict[str, float]:
    """The paper's "Map", Recall and "Acc" (in %), per the module docstring."""
    tp = np.zeros(n_classes)
    fp = np.zeros(n_classes)
    fn = np.zeros(n_classes)
    tn = np.zeros(n_classes)
    for s in slices:
        keep = s.pred_scores >= score_thr
        pb, pl, ps = s.pred_boxes[keep].reshape(-1, 4), s.pred_labels[keep], s.pred_scores[keep]
        used = np.zeros(len(pb), dtype=bool)
        for gb, gl in zip(s.gt_boxes.reshape(-1, 4), s.gt_labels, strict=True):
            pred = 0
            if len(pb):
                ious = box_iou(np.asarray([gb]), pb)[0]
                cand = np.nonzero((ious >= iou_thr) & ~used)[0]
                if cand.size:
                    j = cand[np.argmax(ps[cand])]
                    pred = int(pl[j])
                    used[cand] = True  # the other class hypotheses of the same body are not extra detections
            for c in range(1, n_classes + 1):
                if gl == c and pred == c:
                    tp[c - 1] += 1
                elif gl == c:
                    fn[c - 1] += 1
                elif pred == c:
                    fp[c - 1] += 1
                else:
                    tn[c - 1] += 1
        for j in np.nonzero(~used)[0]:  # detections matching no body
            fp[int(pl[j]) - 1] += 1

    def ratio(a: np.ndarray, b: np.ndarray) -> float:
        vals = np.divide(a, b, out=np.full_like(a, np.nan), where=b > 0)
        return float(np.nanmean(vals) * 100.0) if np.isfinite(vals).any() else float("nan")

    return {"paper_map": ratio(tp, tp + fp), "paper_recall": ratio(tp, tp + fn), "paper_acc": ratio(tp, tp + tn + fn)}


def detection_metrics(slices: Sequence[SliceEval], n_classes: int = 3) -> dict[str, object]:
    """Standard mAP@0.5 (+ per-class AP) and the paper's metrics over labelled slices."""
    preds = [BoxPrediction(s.image, tuple(float(v) for v in b), int(lb), float(sc))
             for s in slices for b, lb, sc in zip(s.pred_boxes.reshape(-1, 4), s.pred_labels, s.pred_scores,
                                                  strict=True)]
    gts = {s.image: [(tuple(float(v) for v in b), int(lb)) for b, lb in zip(s.gt_boxes.reshape(-1, 4), s.gt_labels,
                                                                           strict=True)] for s in slices}
    m = mean_average_precision(preds, gts, 0.5)
    ap = {int(k): float(v) for k, v in dict(m["ap_per_class"]).items()}  # type: ignore[call-overload]
    out: dict[str, object] = {"map50": float(m["map"]), "ap50_per_class": ap}  # type: ignore[arg-type]
    out.update(paper_metrics(slices, n_classes))
    return out


def level_accuracy(predicted: Sequence[dict[str, float]], truth: Sequence[dict[str, float]],
                   tolerance_mm: Sequence[dict[str, float]] | None = None,
                   levels: Sequence[str] = ("L1", "L2", "L3", "L4")) -> float:
    """Share of studies whose every level is named correctly.

    ``predicted[i][level]`` is the predicted body centre (mm) of a level,
    ``truth[i][level]`` the true mid-body position; a level is right when
    the two are within ``tolerance_mm[i][level]`` (default 10 mm, about a
    third of a lumbar body's height).
    """
    if not truth:
        return float("nan")
    ok = 0
    for i, (p, t) in enumerate(zip(predicted, truth, strict=True)):
        tol = tolerance_mm[i] if tolerance_mm is not None else {}
        ok += all(lv in p and lv in t and abs(p[lv] - t[lv]) <= tol.get(lv, 10.0) for lv in levels if lv in t)
    return ok / len(truth)


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = 3) -> list[list[int]]:
    """Confusion matrix as nested lists (rows true, columns predicted)."""
    return confusion_matrix(y_true, y_pred, n_classes).tolist()
