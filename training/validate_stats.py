"""Figures of a site validation (:mod:`training.validate`), computed with scikit-learn.

Every figure is computed from per-unit predictions (one unit = a study, or a
vertebra for ``spine_bmd``) so that confidence intervals, the threshold sweep
and subgroup tables all come from the same numbers. Bootstrap intervals resample
*patients* (a patient's units stay together).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import metrics as skm

__all__ = ["Scores", "age_band", "binary_figures", "multiclass_figures", "rescan_figures", "rescan_sweep", "subgroup_table", "threshold_sweep",
           "wilson"]

NAN = float("nan")


@dataclass
class Scores:
    """Per-unit truth and predictions of a validation.

    ``prob`` is (n,) for a binary task (probability of the positive class) or
    (n, k) for a k-class task; ``pred`` is the bundle's own decision at its
    operating point; ``record`` indexes the scored record of each unit.
    """

    unit: str
    class_names: list[str]
    y_true: np.ndarray
    prob: np.ndarray
    pred: np.ndarray
    record: np.ndarray
    patient: np.ndarray
    threshold: float | None = None
    notes: list[str] = field(default_factory=list)
    # a graded task with a rescan decision (hrpqct_motion): P(class >= rescan_min_class) per unit, the bundle's
    # rescan decision at its operating point, and the first class (0-based) whose truth calls for a rescan
    p_rescan: np.ndarray | None = None
    rescan_pred: np.ndarray | None = None
    rescan_min_class: int | None = None
    rescan_threshold: float | None = None

    @property
    def rescan_true(self) -> np.ndarray | None:
        """Truth of the rescan decision (class >= ``rescan_min_class``), or None without one."""
        if self.rescan_min_class is None:
            return None
        return (self.y_true >= self.rescan_min_class).astype(int)

    @property
    def binary(self) -> bool:
        """Two classes and a 1-D probability."""
        return self.prob.ndim == 1


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (NaNs for ``n == 0``)."""
    if n == 0:
        return NAN, NAN
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else NAN


def patient_bootstrap(fn: Callable[[np.ndarray], float], patients: np.ndarray, *, n_boot: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``fn(unit indices)`` over bootstrap resamples of the patients."""
    ids = np.unique(patients)
    if len(ids) < 2 or n_boot <= 0:
        return NAN, NAN
    by_patient = [np.nonzero(patients == p)[0] for p in ids]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = np.concatenate([by_patient[i] for i in rng.integers(0, len(ids), len(ids))])
        v = fn(idx)
        if not math.isnan(v):
            vals.append(v)
    if len(vals) < max(10, n_boot // 10):
        return NAN, NAN
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else NAN, "ci95": [lo, hi], "k": k, "n": n}


def binary_figures(s: Scores, n_boot: int = 1000) -> dict[str, Any]:
    """AUC (patient bootstrap CI), sensitivity/specificity/PPV/NPV/accuracy (Wilson CIs) at the operating point,
    Brier score and the confusion matrix."""
    y, p, pred = s.y_true.astype(int), s.prob.astype(float), s.pred.astype(int)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    auc = _auc(y, p)
    lo, hi = patient_bootstrap(lambda i: _auc(y[i], p[i]), s.patient, n_boot=n_boot)
    return {
        "n": int(len(y)), "positives": int(y.sum()), "prevalence": float(y.mean()) if len(y) else NAN,
        "auc": {"value": auc, "ci95": [lo, hi]},
        "sensitivity": _rate(tp, tp + fn), "specificity": _rate(tn, tn + fp),
        "ppv": _rate(tp, tp + fp), "npv": _rate(tn, tn + fn), "accuracy": _rate(tp + tn, len(y)),
        "brier": float(skm.brier_score_loss(y, p)) if len(y) else NAN,
        "threshold": s.threshold,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def multiclass_figures(s: Scores, n_boot: int = 1000) -> dict[str, Any]:
    """Macro-F1 and quadratic-weighted kappa (patient bootstrap CIs), accuracy (Wilson), per-class sensitivity,
    the confusion matrix at the operating point, and one-vs-rest AUCs of the ordinal collapses."""
    y, pred = s.y_true.astype(int), s.pred.astype(int)
    k = len(s.class_names)
    labels = list(range(k))

    def f1(i: np.ndarray) -> float:
        return float(skm.f1_score(y[i], pred[i], labels=labels, average="macro", zero_division=0))

    def kappa(i: np.ndarray) -> float:
        if len(np.unique(np.concatenate([y[i], pred[i]]))) < 2:
            return NAN
        return float(skm.cohen_kappa_score(y[i], pred[i], labels=labels, weights="quadratic"))

    every = np.arange(len(y))
    cm = skm.confusion_matrix(y, pred, labels=labels)
    out: dict[str, Any] = {
        "n": int(len(y)), "class_counts": np.bincount(y, minlength=k).tolist(),
        "macro_f1": {"value": f1(every), "ci95": list(patient_bootstrap(f1, s.patient, n_boot=n_boot))},
        "kappa_quadratic": {"value": kappa(every), "ci95": list(patient_bootstrap(kappa, s.patient, n_boot=n_boot))},
        "accuracy": _rate(int(np.trace(cm)), len(y)),
        "sensitivity_per_class": {c: _rate(int(cm[i, i]), int(cm[i].sum())) for i, c in enumerate(s.class_names)},
        "confusion_matrix": cm.tolist(),
    }
    out.update(rescan_figures(s, n_boot))
    for name, score, truth in ordinal_collapses(s):
        out[f"auc {name}"] = {"value": _auc(truth, score),
                              "ci95": list(patient_bootstrap(lambda i, t=truth, q=score: _auc(t[i], q[i]),
                                                             s.patient, n_boot=n_boot))}
    return out


def rescan_figures(s: Scores, n_boot: int = 1000) -> dict[str, Any]:
    """Rescan sensitivity/specificity (Wilson) at the bundle's operating point, the AUC of the rescan
    probability (patient bootstrap CI) and the rescan confusion matrix; empty without a rescan decision."""
    truth = s.rescan_true
    if truth is None or s.p_rescan is None or s.rescan_pred is None:
        return {}
    p, dec = s.p_rescan.astype(float), s.rescan_pred.astype(int)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(truth, dec, labels=[0, 1]).ravel())
    lo, hi = patient_bootstrap(lambda i: _auc(truth[i], p[i]), s.patient, n_boot=n_boot)
    return {"rescan sensitivity": _rate(tp, tp + fn), "rescan specificity": _rate(tn, tn + fp),
            "rescan auc": {"value": _auc(truth, p), "ci95": [lo, hi]}, "rescan_positives": int(truth.sum()),
            "rescan_confusion_matrix": [[tn, fp], [fn, tp]], "rescan_threshold": s.rescan_threshold,
            "rescan_sweep": rescan_sweep(s)}


def ordinal_collapses(s: Scores) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Binary views of a k-class ordinal task: (name, score, truth) for "class j or worse", j = 1..k-1."""
    out = []
    for j in range(1, len(s.class_names)):
        out.append((f"{s.class_names[j]} or worse", s.prob[:, j:].sum(axis=1), (s.y_true >= j).astype(int)))
    return out


def threshold_sweep(y: np.ndarray, score: np.ndarray, thresholds: Sequence[float] | None = None
                    ) -> list[dict[str, float]]:
    """Sensitivity, specificity, PPV, NPV and the counts at each threshold (``score >= t`` is positive)."""
    ts = np.round(np.arange(0.05, 0.96, 0.05), 2) if thresholds is None else np.asarray(thresholds)
    y = np.asarray(y).astype(int)
    rows = []
    for t in ts:
        pred = (np.asarray(score) >= t).astype(int)
        tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
        rows.append({"threshold": float(t), "sensitivity": tp / (tp + fn) if tp + fn else NAN,
                     "specificity": tn / (tn + fp) if tn + fp else NAN, "ppv": tp / (tp + fp) if tp + fp else NAN,
                     "npv": tn / (tn + fn) if tn + fn else NAN, "tp": tp, "fp": fp, "tn": tn, "fn": fn})
    return rows


def rescan_sweep(s: Scores, thresholds: Sequence[float] | None = None) -> list[dict[str, float]]:
    """:func:`threshold_sweep` of the bundle's rescan rule with its threshold moved: a unit is a rescan when its
    predicted class reaches ``rescan_min_class`` (at any threshold) or ``p_rescan >= threshold``."""
    if s.rescan_true is None or s.p_rescan is None:
        return []
    score = np.where(s.pred >= int(s.rescan_min_class or 0), 1.0, s.p_rescan.astype(float))
    return threshold_sweep(s.rescan_true, score, thresholds)


def calibration(y: np.ndarray, score: np.ndarray, bins: int = 5) -> list[dict[str, float]]:
    """Reliability table: mean predicted probability and observed frequency per quantile bin."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(y).astype(int)
    if len(np.unique(y)) < 2:
        return []
    frac, mean = calibration_curve(y, score, n_bins=min(bins, len(y)), strategy="quantile")
    return [{"predicted": float(m), "observed": float(f)} for m, f in zip(mean, frac, strict=True)]


def age_band(age_years: float | None) -> str:
    """Age band of a patient (``unknown`` without an age)."""
    if age_years is None or math.isnan(age_years):
        return "unknown"
    for hi, name in ((18, "<18"), (40, "18-39"), (65, "40-64"), (80, "65-79")):
        if age_years < hi:
            return name
    return ">=80"


def subgroup_table(s: Scores, groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Figures per subgroup value (``groups`` gives each unit's value)."""
    g = np.asarray(groups, dtype=object)
    table: dict[str, dict[str, Any]] = {}
    for value in sorted(set(g.tolist()), key=str):
        i = np.nonzero(g == value)[0]
        y, pred = s.y_true[i].astype(int), s.pred[i].astype(int)
        row: dict[str, Any] = {"n": int(len(i)), "patients": int(len(np.unique(s.patient[i])))}
        if s.binary:
            tp, fn = int(((y == 1) & (pred == 1)).sum()), int(((y == 1) & (pred == 0)).sum())
            tn, fp = int(((y == 0) & (pred == 0)).sum()), int(((y == 0) & (pred == 1)).sum())
            row.update(positives=int(y.sum()), sensitivity=tp / (tp + fn) if tp + fn else NAN,
                       specificity=tn / (tn + fp) if tn + fp else NAN, auc=_auc(y, s.prob[i]))
        else:
            labels = list(range(len(s.class_names)))
            qwk = (float(skm.cohen_kappa_score(y, pred, labels=labels, weights="quadratic"))
                   if len(np.unique(np.concatenate([y, pred]))) > 1 else NAN)
            row.update(accuracy=float(np.mean(y == pred)), kappa_quadratic=qwk,
                       macro_f1=float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)))
            truth = s.rescan_true
            if truth is not None and s.rescan_pred is not None:
                t, d = truth[i], s.rescan_pred[i].astype(int)
                tp, tn = int(((t == 1) & (d == 1)).sum()), int(((t == 0) & (d == 0)).sum())
                pos, neg = int(t.sum()), int((t == 0).sum())
                row.update(rescan_positives=pos, rescan_sensitivity=tp / pos if pos else NAN,
                           rescan_specificity=tn / neg if neg else NAN)
        table[str(value)] = row
    return table
