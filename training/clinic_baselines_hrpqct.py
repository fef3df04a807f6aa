"""HR-pQCT motion baseline: soft-tissue SD and streak energy with an ordinal fit.

Motion streaks cross the featureless soft tissue around the bone, so a reader (or a
one-line script) that looks at how noisy the soft tissue is gets much of the grade.
Per scan, on the 8 slices the network sees (:func:`inference.hrpqct.select_slices`),
in mg HA/cm3:

* ``soft_sd``: SD of the soft-tissue pixels (inside the limb, above -150 mg HA/cm3
  filled, 4 pixels from the skin and from bone, above 300 mg HA/cm3);
* ``soft_hf_median``: median absolute high-pass residual (pixel minus its 5x5 mean)
  in the soft tissue, a streak energy that ignores the odd bright pixel;
* ``row_hf`` / ``col_hf``: mean squared difference of neighbouring soft-tissue
  pixels along rows and along columns (high-frequency energy; streaks run across
  the image in the motion's direction);
* ``air_sd``: SD of the air 6 pixels outside the skin (the scan's noise level, so
  that the fit can tell dose from motion).

Ordinal fit: a least-squares line from the standardised log-features to the grade,
and grade cut points placed between the fitted scores at the fitting part's class
proportions (so the predicted grade keeps the grade distribution). The rescan score is
the fitted continuous grade (its ROC AUC for grade >= 4). Protocols as the histogram
baseline's: fitted on the patients outside a hold-out and scored on it, fitted on
training records, or 5-fold cross-validated by patient on the scored records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from training.data import Record
from training.metrics import cohen_kappa, roc_auc

log = logging.getLogger(__name__)

__all__ = ["FEATURES", "OrdinalLine", "log_features", "motion_baseline", "scan_features", "soft_tissue_features"]

FEATURES = ("soft_sd", "soft_hf_median", "row_hf", "col_hf", "air_sd")
RESCAN_MIN_GRADE = 4


def soft_tissue_features(slices: np.ndarray) -> np.ndarray:
    """:data:`FEATURES` of a (slices, rows, cols) stack in mg HA/cm3 (means over the slices)."""
    feats = []
    for img in np.asarray(slices, dtype=np.float64):
        body = ndimage.binary_fill_holes(ndimage.binary_opening(img > -150.0, iterations=2))
        bone = ndimage.binary_dilation(img > 300.0, iterations=4)
        soft = ndimage.binary_erosion(body, iterations=4) & ~bone
        air = ~ndimage.binary_dilation(body, iterations=6)
        if soft.sum() < 20 or air.sum() < 20:
            continue
        residual = img - ndimage.uniform_filter(img, 5)
        both_r, both_c = soft[:, 1:] & soft[:, :-1], soft[1:, :] & soft[:-1, :]
        feats.append([img[soft].std(), float(np.median(np.abs(residual[soft]))),
                      float(np.mean(np.diff(img, axis=1)[both_r] ** 2)), float(np.mean(np.diff(img, axis=0)[both_c] ** 2)),
                      img[air].std()])
    if not feats:
        raise ValueError("no soft tissue found (above -150 mg HA/cm3 inside the limb, away from bone and skin)")
    return np.mean(feats, axis=0)


def log_features(features: np.ndarray) -> np.ndarray:
    """The fitted inputs: ``log(1 + feature)`` (the energies span orders of magnitude)."""
    return np.log1p(np.asarray(features, dtype=np.float64))


def scan_features(record: Record) -> np.ndarray:
    """Features of one scan's largest CT series, on the slices the network sees."""
    from inference.hrpqct import select_slices
    from inference.series import group_by_series, read_datasets

    volume = max(group_by_series(read_datasets(record.files)).values(), key=len).volume()
    return soft_tissue_features(volume[select_slices(volume.shape[0])])


class OrdinalLine:
    """Least-squares line to the grade plus cut points at the fitted class proportions."""

    def fit(self, x: np.ndarray, grade: np.ndarray) -> OrdinalLine:
        """Fit on log-features ``x`` (n, k) and grades 1-5."""
        self.mean, self.std = x.mean(0), x.std(0) + 1e-9
        z = np.c_[np.ones(len(x)), (x - self.mean) / self.std]
        self.coef = np.linalg.lstsq(z, grade.astype(float), rcond=None)[0]
        s = self.score(x)
        counts = np.bincount(grade, minlength=6)[1:6]
        edges = np.cumsum(counts)[:-1] / len(grade)
        self.cuts = np.quantile(s, np.clip(edges, 0, 1)) if len(s) else np.zeros(4)
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        """The fitted continuous grade."""
        return np.c_[np.ones(len(x)), (x - self.mean) / self.std] @ self.coef

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Grades 1-5."""
        return 1 + np.searchsorted(self.cuts, self.score(x), side="right")


def _fit_score(x: np.ndarray, g: np.ndarray, fit: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = OrdinalLine().fit(x[fit], g[fit])
    return model.predict(x[score]), model.score(x[score])


def motion_baseline(records: Sequence[Record], *, holdout_patients: set[str] | None = None,
                    fit_records: Sequence[Record] | None = None, folds: int = 5) -> dict[str, Any]:
    """QWK, rescan AUC and accuracy of the soft-tissue ordinal fit (see the module docstring for the protocols)."""
    from sklearn.model_selection import GroupKFold

    from training.tasks.hrpqct_motion import grade_of

    recs = list(records)
    x = log_features(np.array([scan_features(r) for r in recs]))
    g = np.array([grade_of(r.row) for r in recs])
    groups = np.array([r.patient_id for r in recs])
    if fit_records:
        fx = log_features(np.array([scan_features(r) for r in fit_records]))
        fg = np.array([grade_of(r.row) for r in fit_records])
        model = OrdinalLine().fit(fx, fg)
        y, pred, score = g, model.predict(x), model.score(x)
        protocol = f"fitted on {len(fg)} training scans, scored on every scan"
    elif holdout_patients:
        sel = np.isin(groups, sorted(holdout_patients))
        if not sel.any() or sel.all():
            raise ValueError("the hold-out patients must be some, not all, of the folder's patients")
        pred, score = _fit_score(x, g, ~sel, sel)
        y = g[sel]
        protocol = "fitted on the patients outside the hold-out, scored on the hold-out"
    else:
        n_groups = len(set(groups.tolist()))
        k = min(folds, n_groups)
        if k < 2:
            raise ValueError("cross-validation needs at least 2 patients")
        pred, score = np.zeros(len(g), dtype=int), np.zeros(len(g))
        for fit, sc in GroupKFold(n_splits=k).split(x, g, groups):
            pred[sc], score[sc] = _fit_score(x, g, fit, sc)
        y = g
        protocol = f"{k}-fold cross-validation grouped by patient on the scored scans"
    rescan = (y >= RESCAN_MIN_GRADE).astype(int)
    return {"name": "soft-tissue SD + streak energy, ordinal fit", "protocol": protocol, "features": list(FEATURES),
            "n": int(len(y)), "unit": "scans", "kappa_quadratic": cohen_kappa(y - 1, pred - 1, "quadratic", 5),
            "accuracy": float(np.mean(y == pred)),
            "rescan_auc": roc_auc(rescan, score) if 0 < rescan.sum() < rescan.size else float("nan")}
