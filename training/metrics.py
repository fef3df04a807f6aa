"""Task metrics: classification, detection (mAP@0.5, FROC) and segmentation (Dice, HD95).

Everything takes plain numpy arrays and returns floats or small dicts, so the
results go straight into ``metrics.json``.

Classification metrics (confusion matrix, sensitivity, F1, kappa, ROC) are scikit-learn's; these functions only
fix the conventions the reports rely on (NaN where a metric is undefined, classes ``0..n-1``). What stays
hand-written is what no maintained library computes in the form the tasks need: the study aggregation of the
"at least one" (ALO) rule, the accuracy-maximising threshold, the bootstrap over cases, VOC all-point AP and FROC
over images with greedy one-to-one matching (torchmetrics' mAP is COCO's 101-point interpolation, which would change
the published mAP@0.5, and no maintained library has FROC), and HD95 over surface voxels with anisotropic spacing
(scipy has no percentile Hausdorff distance; MONAI's needs torch tensors in a one-hot batch layout and MONAI is not a
dependency of this package).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn import exceptions as skm_exceptions
from sklearn import metrics as skm

from inference.boxes import box_iou as _box_iou

log = logging.getLogger(__name__)

__all__ = [
    "BoxPrediction", "accuracy", "accuracy_threshold", "aggregate_by_group", "average_precision", "bootstrap_ci", "box_iou", "classification_report",
    "cohen_kappa", "confusion_matrix", "dice", "froc", "hd95", "macro_f1", "mean_average_precision",
    "roc_auc", "roc_curve", "segmentation_report", "sensitivity_specificity",
]


def _ints(a: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(int).ravel()


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact matches."""
    t, p = _ints(y_true), _ints(y_pred)
    return float(np.mean(t == p)) if t.size else float("nan")


def accuracy_threshold(y_true: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """(threshold, accuracy): the cut ``score >= threshold`` of the highest accuracy on these scores.

    Candidates are the midpoints between neighbouring distinct scores (and just outside both ends); among equally
    accurate cuts the median one is taken, so the threshold sits in the middle of a flat stretch.
    """
    t = _ints(y_true)
    s = np.asarray(scores, dtype=float).ravel()
    if not t.size:
        raise ValueError("accuracy_threshold needs at least one score")
    u = np.unique(s)
    cuts = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-6]])
    acc = np.array([np.mean((s >= c).astype(int) == t) for c in cuts])
    best = np.flatnonzero(acc == acc.max())
    k = int(best[len(best) // 2])
    return float(cuts[k]), float(acc[k])


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int | None = None) -> np.ndarray:
    """Counts ``cm[true, pred]`` for classes ``0..n_classes-1`` (scikit-learn's ``confusion_matrix``)."""
    t, p = _ints(y_true), _ints(y_pred)
    k = n_classes if n_classes is not None else int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if k <= 0:
        return np.zeros((0, 0), dtype=np.int64)
    return skm.confusion_matrix(t, p, labels=np.arange(k)).astype(np.int64)


def sensitivity_specificity(y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1) -> tuple[float, float]:
    """(sensitivity, specificity) of class ``positive`` against the rest; NaN where undefined."""
    t, p = (_ints(y_true) == positive).astype(int), (_ints(y_pred) == positive).astype(int)
    sens = float(skm.recall_score(t, p, pos_label=1, zero_division=np.nan)) if t.any() else float("nan")
    spec = float(skm.recall_score(t, p, pos_label=0, zero_division=np.nan)) if (t == 0).any() else float("nan")
    return sens, spec


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over classes present in ``y_true`` or ``y_pred`` (scikit-learn's default).

    ``n_classes`` is accepted for symmetry with the other functions; absent classes never count.
    """
    t, p = _ints(y_true), _ints(y_pred)
    if not t.size:
        return float("nan")
    return float(skm.f1_score(t, p, average="macro", zero_division=0.0))


def cohen_kappa(y_true: Sequence[int], y_pred: Sequence[int], weights: str | None = None,
                n_classes: int | None = None) -> float:
    """Cohen's kappa (scikit-learn); ``weights`` None (unweighted), ``"linear"`` or ``"quadratic"``.

    NaN where it is undefined (no cases, or all cases in one class on both sides).
    """
    if weights not in (None, "linear", "quadratic"):
        raise ValueError(f"unknown weights {weights!r}")
    t, p = _ints(y_true), _ints(y_pred)
    if not t.size:
        return float("nan")
    k = n_classes if n_classes is not None else int(max(t.max(), p.max()) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", skm_exceptions.UndefinedMetricWarning)
        return float(skm.cohen_kappa_score(t, p, labels=np.arange(k), weights=weights))


def roc_curve(y_true: Sequence[int], score: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), starting at (0, 0), every distinct score a point."""
    t = (_ints(y_true) == 1).astype(int)
    s = np.asarray(score, dtype=float).ravel()
    with warnings.catch_warnings():  # one class only: scikit-learn warns and returns NaN for the missing rate
        warnings.simplefilter("ignore", skm_exceptions.UndefinedMetricWarning)
        fpr, tpr, thr = skm.roc_curve(t, s, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thr


def roc_auc(y_true: Sequence[int], score: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn; ties count one half); NaN with a single class."""
    t = (_ints(y_true) == 1).astype(int)
    if t.size == 0 or t.min() == t.max():
        return float("nan")
    return float(skm.roc_auc_score(t, np.asarray(score, dtype=float).ravel()))


def bootstrap_ci(metric, y_true: Sequence, y_score: Sequence, *, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper) of ``metric(y_true, y_score)`` by percentile bootstrap over cases.

    Resamples that give NaN (e.g. one class only) are skipped.
    """
    t, s = np.asarray(y_true), np.asarray(y_score)
    point = float(metric(t, s))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(t), len(t))
        v = metric(t[idx], s[idx])
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def classification_report(y_true: Sequence[int], prob: np.ndarray, class_names: Sequence[str], *,
                          threshold: float = 0.5, n_boot: int = 1000, seed: int = 0) -> dict[str, object]:
    """All classification metrics for probabilities ``prob`` of shape (N,) (binary) or (N, C).

    Binary: accuracy, sensitivity, specificity, ROC-AUC with bootstrap 95% CI, F1.
    Multi-class: accuracy, macro-F1, Cohen's and quadratic-weighted kappa, per-class
    sensitivity, one-vs-rest AUC. Both include the confusion matrix.
    """
    t = _ints(y_true)
    prob = np.asarray(prob, dtype=float)
    k = len(class_names)
    if prob.ndim == 2 and prob.shape[1] == 1:
        prob = prob[:, 0]
    out: dict[str, object] = {"n": int(t.size), "class_names": list(class_names)}
    if prob.ndim == 1:
        pred = (prob >= threshold).astype(int)
        sens, spec = sensitivity_specificity(t, pred)
        auc, lo, hi = bootstrap_ci(roc_auc, t, prob, n_boot=n_boot, seed=seed)
        out.update(accuracy=accuracy(t, pred), sensitivity=sens, specificity=spec, auc=auc, auc_ci95=[lo, hi],
                   f1=_f1_binary(t, pred), threshold=threshold,
                   confusion_matrix=confusion_matrix(t, pred, 2).tolist())
        return out
    pred = prob.argmax(1)
    out.update(
        accuracy=accuracy(t, pred), macro_f1=macro_f1(t, pred, k), kappa=cohen_kappa(t, pred, None, k),
        kappa_quadratic=cohen_kappa(t, pred, "quadratic", k),
        sensitivity_per_class={c: sensitivity_specificity(t, pred, i)[0] for i, c in enumerate(class_names)},
        auc_ovr={c: roc_auc((t == i).astype(int), prob[:, i]) for i, c in enumerate(class_names)},
        confusion_matrix=confusion_matrix(t, pred, k).tolist(),
    )
    return out


def _f1_binary(t: np.ndarray, p: np.ndarray) -> float:
    return float(skm.f1_score(t == 1, p == 1, zero_division=np.nan))


def aggregate_by_group(values: np.ndarray, groups: Sequence[int], how: str = "max",
                       threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scores from per-image scores: (sorted group ids, aggregated values).

    ``how``: ``"max"`` (the "at least one" rule: a study is positive if any image is),
    ``"mean"`` (mean probability, rows of ``values`` may be class vectors), or
    ``"majority"`` (fraction of images at or above ``threshold``, for a majority vote).
    """
    v = np.asarray(values, dtype=float)
    g = np.asarray(groups).astype(int).ravel()
    ids = np.unique(g)
    out = []
    for i in ids:
        sel = v[g == i]
        if how == "max":
            out.append(sel.max(0))
        elif how == "mean":
            out.append(sel.mean(0))
        elif how == "majority":
            out.append(float(np.mean(sel >= threshold)))
        else:
            raise ValueError(f"unknown aggregation {how!r}")
    return ids, np.asarray(out)


# --- detection -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoxPrediction:
    """A predicted box ``(x0, y0, x1, y1)`` on image ``image`` with a class label and a score."""

    image: str
    box: tuple[float, float, float, float]
    label: int
    score: float


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) in (x0, y0, x1, y1) (:func:`torchvision.ops.box_iou`)."""
    return _box_iou(a, b)


def _match(preds: list[BoxPrediction], gts: dict[str, np.ndarray], iou_thr: float) -> np.ndarray:
    """True-positive flags for predictions sorted by descending score (greedy, each GT matched once)."""
    used = {img: np.zeros(len(b), dtype=bool) for img, b in gts.items()}
    tp = np.zeros(len(preds), dtype=bool)
    for i, p in enumerate(preds):
        g = gts.get(p.image)
        if g is None or len(g) == 0:
            continue
        ious = box_iou(np.asarray([p.box]), g)[0]
        ious[used[p.image]] = -1.0
        j = int(np.argmax(ious))
        if ious[j] >= iou_thr:
            tp[i] = True
            used[p.image][j] = True
    return tp


def average_precision(preds: Sequence[BoxPrediction], gts: dict[str, np.ndarray], iou_thr: float = 0.5) -> float:
    """VOC-style all-point interpolated AP for one class.

    ``gts`` maps image id -> ground-truth boxes (K, 4) of this class. NaN with no ground truth.
    """
    n_gt = int(sum(len(b) for b in gts.values()))
    if n_gt == 0:
        return float("nan")
    ps = sorted(preds, key=lambda p: -p.score)
    if not ps:
        return 0.0
    tp = _match(ps, gts, iou_thr)
    ctp, cfp = np.cumsum(tp), np.cumsum(~tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, 1)
    mrec = np.r_[0.0, recall, 1.0]
    mpre = np.r_[0.0, precision, 0.0]
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def mean_average_precision(preds: Sequence[BoxPrediction], gts: dict[str, list[tuple[tuple[float, ...], int]]],
                           iou_thr: float = 0.5) -> dict[str, object]:
    """mAP@``iou_thr`` over classes with ground truth; ``gts`` maps image -> [(box, label), ...]."""
    labels = sorted({lab for boxes in gts.values() for _, lab in boxes})
    per_class: dict[int, float] = {}
    for lab in labels:
        g = {img: np.asarray([b for b, lb in boxes if lb == lab], dtype=float).reshape(-1, 4) for img, boxes in gts.items()}
        per_class[lab] = average_precision([p for p in preds if p.label == lab], g, iou_thr)
    vals = [v for v in per_class.values() if not np.isnan(v)]
    return {"map": float(np.mean(vals)) if vals else float("nan"), "ap_per_class": per_class}


def froc(preds: Sequence[BoxPrediction], gts: dict[str, np.ndarray], n_images: int, *, iou_thr: float = 0.5,
         fps_per_image: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8)) -> dict[str, object]:
    """Free-response ROC: lesion sensitivity at given false positives per image, and their mean.

    ``gts`` maps image id -> ground-truth boxes (K, 4); all images count for the FP rate.
    """
    n_gt = int(sum(len(b) for b in gts.values()))
    ps = sorted(preds, key=lambda p: -p.score)
    tp = _match(ps, gts, iou_thr) if ps else np.zeros(0, dtype=bool)
    sens_curve = np.cumsum(tp) / n_gt if n_gt else np.full(len(ps), np.nan)
    fp_curve = np.cumsum(~tp) / max(n_images, 1)
    points = []
    for f in fps_per_image:
        ok = np.nonzero(fp_curve <= f)[0]
        points.append(float(sens_curve[ok[-1]]) if ok.size else 0.0)
    return {"fps_per_image": list(map(float, fps_per_image)), "sensitivity": points,
            "mean_sensitivity": float(np.mean(points)) if points else float("nan"),
            "curve_fp": fp_curve.tolist(), "curve_sensitivity": sens_curve.tolist()}


# --- segmentation --------------------------------------------------------------------------------------


def dice(pred: np.ndarray, truth: np.ndarray, *, empty: float = 1.0) -> float:
    """Dice coefficient of two binary masks; ``empty`` when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    denom = p.sum() + t.sum()
    return float(2.0 * np.logical_and(p, t).sum() / denom) if denom else float(empty)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile symmetric Hausdorff distance between mask surfaces, in units of ``spacing``.

    0 when both masks are empty, infinity when exactly one is.
    """
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("inf")
    sp = tuple(spacing) if spacing is not None else (1.0,) * p.ndim
    sp_, st = _surface(p), _surface(t)
    dt_t = ndimage.distance_transform_edt(~st, sampling=sp)
    dt_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    d = np.r_[dt_t[sp_], dt_p[st]]
    return float(np.percentile(d, 95))


def segmentation_report(pred: np.ndarray, truth: np.ndarray, names: Sequence[str],
                        spacing: Sequence[float] | None = None, *, channels_first: bool = False) -> dict[str, dict[str, float]]:
    """Dice and HD95 per structure.

    With ``channels_first`` the arrays are boolean stacks with a leading axis of length
    ``len(names)`` (multi-label, overlapping structures allowed); otherwise they are
    integer label maps in which label ``i + 1`` is ``names[i]``.
    """
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(names):
        if channels_first:
            pm, tm = np.asarray(pred[i], dtype=bool), np.asarray(truth[i], dtype=bool)
        else:
            pm, tm = pred == i + 1, truth == i + 1
        out[name] = {"dice": dice(pm, tm), "hd95": hd95(pm, tm, spacing)}
    return out
