"""Non-deep baseline: logistic regression on intensity histograms, cross-validated by patient.

The synthetic studies must not be solvable by a simple baseline (issue "Synthetic
studies"): if a histogram of the pixel values separated the classes, a CNN's figure
would say nothing about whether it learnt the fracture, the motion streaks or the
bone. ``dicomnode-train baseline TASK --data DIR`` measures it on a labelled folder:

* ``wrist_fracture``: one histogram per study (mean over its images of the 8-bit
  display image, window applied), study label, ROC-AUC;
* ``physis_fracture``: one histogram per image, image label, ROC-AUC;
* ``hrpqct_motion``: the 8 slices the network sees (:func:`inference.hrpqct.select_slices`)
  in density units over -500..2500 mg HA/cm3, grade 1-5, quadratic-weighted kappa;
* ``spine_bmd``: the whole CT in HU over -200..1200, the patient-level class,
  macro-F1 and quadratic-weighted kappa.

Folds group studies by patient (:class:`sklearn.model_selection.GroupKFold`), so
no patient is in both the fitted and the scored part. ``knee_bone_seg`` is a
segmentation task without a per-study label and has no histogram baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from inference.errors import DicomNodeError
from training import metrics
from training.data import DataError, Record, load_records
from training.synth.manifest import ManifestError

log = logging.getLogger(__name__)

TASKS = ("wrist_fracture", "physis_fracture", "hrpqct_motion", "spine_bmd")


class BaselineError(DicomNodeError):
    """The folder cannot be scored (no manifest, unsupported task, too few studies per class)."""


def display_histogram(ds: pydicom.Dataset, bins: int) -> np.ndarray:
    """Normalised histogram of the 8-bit display image of a radiograph (window and polarity applied)."""
    from training.synth.preview import display_image

    h = np.histogram(display_image(ds), bins=bins, range=(0, 255))[0].astype(np.float64)
    return h / max(h.sum(), 1.0)


def value_histogram(values: np.ndarray, bins: int, value_range: tuple[float, float]) -> np.ndarray:
    """Normalised histogram of modality values (values outside the range count in the end bins)."""
    h = np.histogram(np.clip(values, *value_range), bins=bins, range=value_range)[0].astype(np.float64)
    return h / max(h.sum(), 1.0)


def _unit_histogram(task: str, files: Sequence[Path], bins: int) -> np.ndarray:
    """Histogram feature of one labelled unit (a study's files, or one image)."""
    if task in ("wrist_fracture", "physis_fracture"):
        return np.mean([display_histogram(pydicom.dcmread(f), bins) for f in files], axis=0)
    from inference.series import group_by_series, read_datasets

    volume = max(group_by_series(read_datasets(files)).values(), key=len).volume()  # the study's largest series
    if task == "hrpqct_motion":
        from inference.hrpqct import select_slices

        return value_histogram(volume[select_slices(volume.shape[0])], bins, (-500.0, 2500.0))
    return value_histogram(volume, bins, (-200.0, 1200.0))


def features(task: str, data: str | os.PathLike[str] | Sequence[Record],
             bins: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram features, labels and patient groups of every labelled unit of ``task``.

    ``data`` is a labelled folder or its records (:func:`training.data.load_records`).

    Returns
    -------
    x, y, groups:
        ``x`` (units, bins), integer labels ``y`` (0-based) and patient IDs ``groups``.
    """
    if task not in TASKS:
        raise BaselineError(f"no histogram baseline for task {task!r} (one of {', '.join(TASKS)})")
    if isinstance(data, str | os.PathLike):
        try:
            data = load_records(data)
        except (ManifestError, DataError) as exc:
            raise BaselineError(str(exc)) from exc
    records = [r for r in data if r.row.get("task", task) == task]
    if not records:
        raise BaselineError(f"no labelled {task} studies")
    x = np.array([_unit_histogram(task, r.files, bins) for r in records])
    y = np.array([_label_index(task, r.row["label"]) for r in records])
    return x, y, np.array([r.patient_id for r in records])


def _label_index(task: str, label: Any) -> int:
    if task == "hrpqct_motion":
        return int(label) - 1  # grades 1-5
    if task == "spine_bmd":
        from training.synth.spine_bmd import CLASSES

        return CLASSES.index(str(label))
    return int(label)


def _fit_predict(x: np.ndarray, y: np.ndarray, fit: np.ndarray, score: np.ndarray, n_classes: int,
                 c: float) -> np.ndarray:
    """Class probabilities of the ``score`` units from a standardised logistic regression fitted on ``fit``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    prob = np.zeros((len(x[score]), n_classes))
    classes = np.unique(y[fit])
    if len(classes) < 2:  # the fitted part holds one class: predict it
        prob[:, int(classes[0])] = 1.0
        return prob
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    model.fit(x[fit], y[fit])
    prob[:, model.classes_] = model.predict_proba(x[score])
    return prob


def cross_validated_probabilities(x: np.ndarray, y: np.ndarray, groups: np.ndarray, folds: int = 5,
                                  c: float = 1.0, n_classes: int | None = None) -> np.ndarray:
    """Out-of-fold class probabilities of a standardised logistic regression, folds grouped by patient.

    One column per class ``0 .. n_classes - 1`` (default: up to the largest label).
    """
    from sklearn.model_selection import GroupKFold

    n_groups = len(set(groups.tolist()))
    if n_groups < folds:
        raise BaselineError(f"{folds}-fold cross-validation needs at least {folds} patients, got {n_groups}")
    if len(np.unique(y)) < 2:
        raise BaselineError("every study has the same label: nothing to separate")
    prob = np.zeros((len(y), n_classes or int(y.max()) + 1))
    for fit, score in GroupKFold(n_splits=folds).split(x, y, groups):
        prob[score] = _fit_predict(x, y, fit, score, prob.shape[1], c)
    return prob


def _figures(task: str, y: np.ndarray, prob: np.ndarray) -> dict[str, Any]:
    if task in ("wrist_fracture", "physis_fracture"):
        return {"auc": metrics.roc_auc(y, prob[:, 1]) if len(np.unique(y)) == 2 else float("nan"),
                "accuracy": metrics.accuracy(y, (prob[:, 1] >= 0.5).astype(int))}
    pred = prob.argmax(axis=1)
    return {"kappa_quadratic": metrics.cohen_kappa(y, pred, weights="quadratic", n_classes=prob.shape[1]),
            "macro_f1": metrics.macro_f1(y, pred, n_classes=prob.shape[1]), "accuracy": metrics.accuracy(y, pred)}


def _n_classes(task: str, y: np.ndarray) -> int:
    return {"hrpqct_motion": 5, "spine_bmd": 3}.get(task, max(2, int(y.max()) + 1))


def run_baseline(task: str, data: str | os.PathLike[str] | Sequence[Record], *, bins: int = 32, folds: int = 5,
                 c: float = 1.0, holdout_patients: set[str] | None = None, fit_root: Path | None = None) -> dict[str, Any]:
    """The baseline's figures on a labelled folder (or its records).

    By default: out-of-fold predictions of a ``folds``-fold cross-validation grouped
    by patient, over every unit. With ``holdout_patients`` (an evaluation of a bundle
    on its locked hold-out): fitted on every other patient's units and scored on the
    hold-out patients' units, the protocol the network was held to. With ``fit_root``
    (an external test set): fitted on that folder (e.g. the network's training data)
    and scored on every unit of ``data``.
    """
    x, y, groups = features(task, data, bins)
    out: dict[str, Any] = {"task": task, "bins": bins}
    if fit_root is not None:
        fx, fy, _ = features(task, Path(fit_root), bins)
        n_classes = max(_n_classes(task, y), _n_classes(task, fy))
        xx, yy = np.concatenate([fx, x]), np.concatenate([fy, y])
        fit = np.arange(len(xx)) < len(fx)
        prob = _fit_predict(xx, yy, fit, ~fit, n_classes, c)
        y_scored, scored_groups = y, groups
        out.update(protocol=f"fitted on {len(fy)} units of {Path(fit_root).name}, scored on every unit",
                   n_fitted=int(len(fy)))
    elif holdout_patients:
        score = np.isin(groups, sorted(holdout_patients))
        if not score.any() or score.all():
            raise BaselineError("the hold-out patients must be some, not all, of the folder's patients")
        prob = _fit_predict(x, y, ~score, score, _n_classes(task, y), c)
        y_scored, scored_groups = y[score], groups[score]
        out.update(protocol="fitted on the patients outside the hold-out, scored on the hold-out",
                   n_fitted=int(np.sum(~score)))
    else:
        prob = cross_validated_probabilities(x, y, groups, folds, c, n_classes=_n_classes(task, y))
        y_scored, scored_groups = y, groups
        out.update(protocol=f"{folds}-fold cross-validation grouped by patient", folds=folds)
    out.update(n=int(len(y_scored)), patients=int(len(set(scored_groups.tolist()))),
               class_counts=np.bincount(y_scored, minlength=_n_classes(task, y)).tolist())
    out.update(_figures(task, y_scored, prob))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train baseline``."""
    p.add_argument("task", choices=TASKS)
    p.add_argument("--data", type=Path, required=True, help="labelled folder (DICOM studies + labels manifest)")
    p.add_argument("--bins", type=int, default=32)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")


def run(args: argparse.Namespace) -> int:
    """Print the baseline's figures as JSON; exit 2 with a message when the folder cannot be scored."""
    try:
        result = run_baseline(args.task, args.data, bins=args.bins, folds=args.folds)
    except BaselineError as exc:
        log.error("%s", exc)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0
