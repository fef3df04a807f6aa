"""Scan-level evaluation of ``hrpqct_motion``: grade metrics, rescan operating point, grade cut points.

Split out of :mod:`training.tasks.hrpqct_motion` (which re-exports these names); see its docstring for the
evaluation protocol.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from inference.tasks.hrpqct_motion import (
    GRADES,
    ROUNDING_CUTPOINTS,
    aggregate_scan,
    check_cutpoints,
    grade_from_expected,
    recommends_rescan,
)
from training.metrics import (
    accuracy,
    cohen_kappa,
    confusion_matrix,
    macro_f1,
    roc_auc,
    sensitivity_specificity,
)

__all__ = ["CLASS_NAMES", "choose_grade_cutpoints", "choose_rescan_threshold", "scan_metrics"]

CLASS_NAMES = [f"grade {g}" for g in GRADES]


def choose_rescan_threshold(true_grade: np.ndarray, p_rescan: np.ndarray, pred_grade: np.ndarray, *,
                            target: float, min_grade: int = 4) -> float | None:
    """The highest ``P(grade >= min_grade)`` threshold whose rescan decision reaches ``target`` sensitivity.

    The decision is ``pred_grade >= min_grade or p_rescan >= threshold``. Returns None when the grade
    rule alone reaches the target or there is no scan graded ``>= min_grade`` to choose from.
    """
    pos = np.asarray(true_grade) >= min_grade
    n_pos = int(pos.sum())
    if n_pos == 0:
        return None
    caught = pos & recommends_rescan(pred_grade, p_rescan, rescan_min_grade=min_grade)
    need = math.ceil(target * n_pos - 1e-9) - int(caught.sum())
    if need <= 0:
        return None
    missed = np.sort(np.asarray(p_rescan, dtype=np.float64)[pos & ~caught])[::-1]
    return float(min(max(missed[need - 1], 1e-6), 1.0 - 1e-6))


def choose_grade_cutpoints(true_grade: np.ndarray, expected: np.ndarray, *, max_passes: int = 20
                           ) -> tuple[float, ...]:
    """Cut points of the expected grade that maximise the quadratic-weighted kappa on ``(true_grade, expected)``.

    Coordinate ascent from rounding (:data:`ROUNDING_CUTPOINTS`): each cut point in turn moves to the midpoint
    between neighbouring expected grades (inside its neighbours' interval) with the highest kappa, and only
    when that is strictly higher, until a pass changes nothing. Ties keep the current value, so cut points
    that the data cannot inform stay at rounding.
    """
    y0 = np.asarray(true_grade, dtype=int) - 1
    e = np.asarray(expected, dtype=np.float64)
    if y0.size != e.size:
        raise ValueError(f"{y0.size} grades for {e.size} expected grades")
    k = len(GRADES)

    def score(c: list[float]) -> float:
        q = cohen_kappa(y0, grade_from_expected(e, c) - 1, "quadratic", k)
        return -math.inf if not np.isfinite(q) else q

    u = np.unique(np.clip(e, GRADES[0], GRADES[-1]))
    mids = (u[1:] + u[:-1]) / 2 if u.size > 1 else np.zeros(0)
    cuts = list(ROUNDING_CUTPOINTS)
    best = score(cuts)
    for _ in range(max_passes):
        changed = False
        for i in range(len(cuts)):
            lo = cuts[i - 1] if i > 0 else float(GRADES[0])
            hi = cuts[i + 1] if i + 1 < len(cuts) else float(GRADES[-1])
            for m in mids[(mids > lo) & (mids < hi)]:
                trial = cuts[:i] + [float(m)] + cuts[i + 1:]
                q = score(trial)
                if q > best + 1e-12:
                    best, cuts, changed = q, trial, True
        if not changed:
            break
    return check_cutpoints(cuts)


def _generating_grade_metrics(t0: np.ndarray, generating_grade: np.ndarray, y_rescan: np.ndarray,
                              rescan_min_grade: int) -> dict[str, float]:
    """How well the generator's own grade agrees with the (noisy) labels: the ceiling of any model."""
    k = len(GRADES)
    g0 = generating_grade.astype(int) - 1
    g_sens, g_spec = sensitivity_specificity(y_rescan, (generating_grade >= rescan_min_grade).astype(int))
    return {"generating_grade_kappa_quadratic": cohen_kappa(t0, g0, "quadratic", k),
            "generating_grade_accuracy": accuracy(t0, g0), "generating_grade_rescan_sensitivity": g_sens,
            "generating_grade_rescan_specificity": g_spec}


def _motion_ssd_correlation(motion_ssd: np.ndarray, pred: np.ndarray, y_true: np.ndarray) -> dict[str, float]:
    """Spearman correlation of the generator's motion estimate with the predicted (and the true) grade."""
    ok = np.isfinite(motion_ssd)
    if not (ok.sum() >= 3 and len(np.unique(pred[ok])) > 1 and len(np.unique(motion_ssd[ok])) > 1):
        return {"motion_ssd_spearman_pred": math.nan, "motion_ssd_spearman_true": math.nan}
    from scipy.stats import spearmanr

    rho, pval = spearmanr(motion_ssd[ok], pred[ok])
    rho_true, _ = spearmanr(motion_ssd[ok], y_true[ok]) if len(np.unique(y_true[ok])) > 1 else (math.nan, 0)
    return {"motion_ssd_spearman_pred": float(rho), "motion_ssd_spearman_pred_p": float(pval),
            "motion_ssd_spearman_true": float(rho_true)}


def _scan_tables(pred: np.ndarray, p_rescan: np.ndarray, y_rescan: np.ndarray, motion_ssd: np.ndarray,
                 rescan_min_grade: int) -> dict[str, Any]:
    """Rescan sensitivity/specificity at fixed operating points and the motion estimate by predicted grade."""
    tables: dict[str, Any] = {}
    if 0 < y_rescan.sum() < y_rescan.size:
        tables["rescan operating points"] = {
            f"P(grade >= {rescan_min_grade}) >= {t:.2f}": dict(zip(
                ("sensitivity", "specificity"),
                sensitivity_specificity(y_rescan, recommends_rescan(pred, p_rescan, rescan_min_grade=rescan_min_grade,
                                                                    rescan_threshold=t).astype(int)),
                strict=True))
            for t in (0.1, 0.2, 0.3, 0.4, 0.5)
        }
    ok = np.isfinite(motion_ssd)
    if ok.any():
        tables["motion_ssd by predicted grade"] = {
            f"grade {g}": {"n": int(np.sum(pred[ok] == g)),
                           "median_ssd": float(np.median(motion_ssd[ok][pred[ok] == g])) if np.any(pred[ok] == g)
                           else math.nan}
            for g in GRADES
        }
    return tables


def scan_metrics(y_true: np.ndarray, mean_probs: np.ndarray, slice_true: np.ndarray, slice_pred: np.ndarray,
                 motion_ssd: np.ndarray, *, aggregation: str = "argmax", rescan_min_grade: int = 4,
                 rescan_threshold: float | None = None, generating_grade: np.ndarray | None = None,
                 cutpoints: tuple[float, ...] | None = None
                 ) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """Scan-level metrics from true grades (1-5) and mean probability vectors (N, 5).

    ``generating_grade`` (synthetic data: the grade the generator's motion was drawn for, before rater
    noise) adds how well that grade itself agrees with the labels: the ceiling of any model on this data.

    Returns (metrics, predicted grades 1-5, tables).
    """
    scans = [aggregate_scan(p[None], aggregation=aggregation, rescan_min_grade=rescan_min_grade,  # type: ignore[arg-type]
                            rescan_threshold=rescan_threshold, cutpoints=cutpoints) for p in mean_probs]
    pred = np.asarray([sg.grade for sg in scans], dtype=int)
    p_rescan = np.asarray([sg.p_rescan for sg in scans], dtype=np.float64)
    t0, p0 = y_true - 1, pred - 1
    k = len(GRADES)
    y_rescan = (y_true >= rescan_min_grade).astype(int)
    sens, spec = sensitivity_specificity(y_rescan, recommends_rescan(pred, p_rescan, rescan_min_grade=rescan_min_grade,
                                                                     rescan_threshold=rescan_threshold).astype(int))
    metrics: dict[str, Any] = {
        "n": int(y_true.size), "n_slices": int(slice_true.size), "class_names": CLASS_NAMES,
        "accuracy": accuracy(t0, p0), "macro_f1": macro_f1(t0, p0, k),
        "kappa": cohen_kappa(t0, p0, None, k), "kappa_quadratic": cohen_kappa(t0, p0, "quadratic", k),
        "kappa_linear": cohen_kappa(t0, p0, "linear", k),
        "within_one_grade": float(np.mean(np.abs(t0 - p0) <= 1)) if t0.size else math.nan,
        "rescan_sensitivity": sens, "rescan_specificity": spec, "rescan_threshold": rescan_threshold,
        "rescan_auc": roc_auc(y_rescan, p_rescan) if 0 < y_rescan.sum() < y_rescan.size else math.nan,
        "slice_accuracy": accuracy(slice_true, slice_pred),
        "confusion_matrix": confusion_matrix(t0, p0, k).tolist(),
        "label_distribution": np.bincount(t0, minlength=k).tolist(),
    }
    if generating_grade is not None and generating_grade.size == y_true.size and np.all(generating_grade > 0):
        metrics.update(_generating_grade_metrics(t0, generating_grade, y_rescan, rescan_min_grade))
    metrics.update(_motion_ssd_correlation(motion_ssd, pred, y_true))
    return metrics, pred, _scan_tables(pred, p_rescan, y_rescan, motion_ssd, rescan_min_grade)
