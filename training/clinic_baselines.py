"""The clinic's simple rules as permanent baselines beside the network (issue 34).

A network's figure means little when a rule a clinic already uses, or a one-feature
fit, scores nearly as well on the same records. :func:`run_clinic_baselines` scores
every simple baseline of a task on exactly the records the network was scored on,
and :func:`compare` sets the strongest one against the network in the task's
comparison metric, flagging a margin below :data:`MARGIN`:

* ``spine_bmd``: the opportunistic-CT rule. The task's own level finder
  (:func:`inference.tasks.spine_bmd_levels.find_levels`) names L1-L4; on each body's
  mid-body slices (:func:`~inference.tasks.spine_bmd_levels.select_slices`) a fixed
  16 mm (left-right) x 14 mm (front-back) box centred in the vertebral body
  (:data:`ROI_CENTRE_MM` behind the anterior cortex, on the spine's midline column)
  gives the mean HU, and > 160 HU is normal, 110-160 osteopenia, < 110 osteoporosis.
  No fitting. Vertebra macro-F1 (the levels the finder names, as for the network)
  and the patient class (the lowest of L1-L4).
* ``hrpqct_motion``: soft-tissue SD and streak energy with an ordinal fit
  (:mod:`training.clinic_baselines_hrpqct`).
* ``knee_bone_seg``: a coordinate-only atlas and threshold plus connected
  components (:mod:`training.clinic_baselines_knee`).
* ``wrist_fracture``, ``physis_fracture``: the histogram baseline (:mod:`training.baseline`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.errors import DicomNodeError
from training.data import Record
from training.metrics import cohen_kappa, confusion_matrix, macro_f1

log = logging.getLogger(__name__)

__all__ = ["COMPARISON", "MARGIN", "REPORTED", "SPINE_CUTS_HU", "compare", "hu_class", "run_clinic_baselines",
           "spine_roi_hu", "spine_rule"]

#: smallest margin over the strongest baseline, in the comparison metric, that a shipped bundle must keep
MARGIN = 0.10
#: opportunistic-CT thresholds on trabecular L1 attenuation (HU): above the first normal, below the second osteoporosis
SPINE_CUTS_HU = (160.0, 110.0)
#: centre of the ROI behind the anterior cortex of the body (mm), and its size (left-right, front-back; mm)
ROI_CENTRE_MM = 16.0
ROI_SIZE_MM = (16.0, 14.0)
#: task -> (network metric, baseline metric) compared; wrist's primary (ALO accuracy) has no baseline counterpart,
#: so its study AUC (the target's metric) is compared with the histogram baseline's AUC
COMPARISON: dict[str, tuple[str, str]] = {
    "spine_bmd": ("vertebra_macro_f1", "vertebra_macro_f1"),
    "hrpqct_motion": ("kappa_quadratic", "kappa_quadratic"),
    "knee_bone_seg": ("dice_mean", "dice_mean"),
    "wrist_fracture": ("study_auc", "auc"),
    "physis_fracture": ("auc", "auc"),
}


#: task -> (network metric, baseline metric) pairs shown in the report's comparison table
REPORTED: dict[str, tuple[tuple[str, str], ...]] = {
    "spine_bmd": (("vertebra_macro_f1", "vertebra_macro_f1"), ("patient_macro_f1", "patient_macro_f1"),
                  ("patient_kappa_quadratic", "patient_kappa_quadratic")),
    "hrpqct_motion": (("kappa_quadratic", "kappa_quadratic"), ("rescan_auc", "rescan_auc")),
    "knee_bone_seg": (("dice_femur", "dice_femur"), ("dice_tibia", "dice_tibia"), ("dice_fibula", "dice_fibula"),
                      ("dice_mean", "dice_mean")),
    "wrist_fracture": (("study_auc", "auc"),),
    "physis_fracture": (("auc", "auc"),),
}


class ClinicBaselineError(DicomNodeError):
    """A baseline cannot be scored on these records (too few, unreadable, no labels)."""


def hu_class(mean_hu: float, cuts: tuple[float, float] = SPINE_CUTS_HU) -> int:
    """Class index (0 normal, 1 osteopenia, 2 osteoporosis) of a trabecular mean HU by the 160/110 rule."""
    if mean_hu > cuts[0]:
        return 0
    return 1 if mean_hu >= cuts[1] else 2


def spine_roi_hu(volume_hu: np.ndarray, positions: np.ndarray, spacing: tuple[float, float], *,
                 anterior_up: bool = True, cortex_hu: float = 300.0) -> dict[str, float]:
    """Mean HU of the central box of each body the level finder names L1-L4, over its mid-body slices."""
    from inference.tasks.spine_bmd_levels import REPORTED_LEVELS, find_levels, select_slices

    geom = find_levels(volume_hu, positions, spacing, cortex_hu=cortex_hu, anterior_up=anterior_up)
    half_r, half_c = ROI_SIZE_MM[1] / 2 / spacing[0], ROI_SIZE_MM[0] / 2 / spacing[1]
    sign = 1.0 if anterior_up else -1.0
    out: dict[str, float] = {}
    for run in geom.runs:
        if run.name not in REPORTED_LEVELS:
            continue
        values = []
        for i in select_slices(run, positions):
            cr = float(geom.anterior_row[i]) + sign * ROI_CENTRE_MM / spacing[0]
            col = _body_column(volume_hu[i], float(geom.anterior_row[i]), geom.column, spacing, sign, cortex_hu)
            r0, r1 = max(0, round(cr - half_r)), min(volume_hu.shape[1], round(cr + half_r) + 1)
            c0, c1 = max(0, round(col - half_c)), min(volume_hu.shape[2], round(col + half_c) + 1)
            roi = np.asarray(volume_hu[i, r0:r1, c0:c1], dtype=np.float64)
            values.append(roi[(roi >= -200.0) & (roi <= 1000.0)])
        voxels = np.concatenate(values) if values else np.zeros(0)
        if voxels.size:
            out[run.name] = float(voxels.mean())
    return out


def _body_column(slice_hu: np.ndarray, anterior_row: float, column: int, spacing: tuple[float, float],
                 sign: float, cortex_hu: float) -> float:
    """This slice's body centre column: the mean column of cortical bone in the body's front 20 mm, within
    30 mm of the spine's midline (a scoliotic or rotated body sits off the stack's midline column, where a
    box on that column would reach the lateral cortex, as a reader's ROI never does)."""
    rows = sorted((round(anterior_row), round(anterior_row + sign * 20.0 / spacing[0])))
    r0, r1 = max(0, rows[0]), min(slice_hu.shape[0], rows[1] + 1)
    half = round(30.0 / spacing[1])
    c0, c1 = max(0, column - half), min(slice_hu.shape[1], column + half + 1)
    _, cols = np.nonzero(np.asarray(slice_hu[r0:r1, c0:c1]) >= cortex_hu)
    return float(c0 + cols.mean()) if cols.size else float(column)


def _spine_study(record: Record) -> tuple[dict[str, int], dict[str, float], int | None]:
    """Truth per level, ROI HU per found level and the manifest's patient class of one study."""
    from inference.series import load_series
    from inference.tasks.spine_bmd import anterior_is_up, slice_positions
    from inference.tasks.spine_bmd_levels import CLASS_NAMES
    from training.tasks.spine_bmd import study_truth

    series = load_series(record.files)
    positions = slice_positions(series)
    sops = {str(p.ds.SOPInstanceUID): i for i, p in enumerate(series.planes)}
    truth = study_truth(record.row, sops, positions)
    hu = spine_roi_hu(series.volume(), positions, (float(series.spacing[1]), float(series.spacing[2])),
                      anterior_up=anterior_is_up(series))
    label = str(record.row.get("label"))
    return truth["classes"], hu, CLASS_NAMES.index(label) if label in CLASS_NAMES else None


def spine_rule(records: Sequence[Record], cuts: tuple[float, float] = SPINE_CUTS_HU) -> dict[str, Any]:
    """Figures of the 160/110 HU rule on ``records`` (no fitting: the same on any subset)."""
    from inference.tasks.spine_bmd_levels import REPORTED_LEVELS

    y, pred, p_true, p_pred, hus = [], [], [], [], []
    missed = 0
    for rec in records:
        classes, hu, patient = _spine_study(rec)
        for lv in REPORTED_LEVELS:
            if lv not in classes:
                continue
            if lv not in hu:
                missed += 1
                continue
            y.append(classes[lv])
            pred.append(hu_class(hu[lv], cuts))
            hus.append(hu[lv])
        if patient is not None and hu:
            p_true.append(patient)
            p_pred.append(max(hu_class(v, cuts) for lv, v in hu.items()))
    if not y:
        raise ClinicBaselineError("the level finder named no labelled vertebra in these studies")
    t, p = np.asarray(y), np.asarray(pred)
    out: dict[str, Any] = {
        "name": "ROI mean HU, 160/110 HU rule", "protocol": "no fitting (fixed thresholds), same records",
        "n": int(t.size), "unit": "vertebrae", "patients": len({r.patient_id for r in records}), "vertebrae_missed": missed,
        "vertebra_macro_f1": macro_f1(t, p, 3), "vertebra_accuracy": float(np.mean(t == p)),
        "vertebra_kappa_quadratic": cohen_kappa(t, p, "quadratic", 3),
        "confusion_matrix": confusion_matrix(t, p, 3).tolist(), "mean_roi_hu": float(np.mean(hus)),
    }
    if p_true:
        out.update(patient_macro_f1=macro_f1(p_true, p_pred, 3),
                   patient_kappa_quadratic=cohen_kappa(p_true, p_pred, "quadratic", 3),
                   patient_accuracy=float(np.mean(np.asarray(p_true) == np.asarray(p_pred))), n_patients_scored=len(p_true))
    return out


def run_clinic_baselines(task: str, records: Sequence[Record], *, holdout_patients: set[str] | None = None,
                         fit_records: Sequence[Record] | None = None, fit_dir: Any = None,
                         precomputed: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every simple baseline of ``task`` scored on ``records`` (the network's records).

    ``holdout_patients``: the records are a folder whose patients outside this set may be used for
    fitting (a bundle's locked hold-out); else fitted baselines are cross-validated by patient on the
    scored records, or fitted on ``fit_records`` / ``fit_dir`` (the training data) when given.
    A baseline that cannot be scored gives ``{"error": ...}``; the others stand. ``precomputed`` holds
    baselines already scored the same way (the histogram baseline of an evaluation run with ``baseline=True``).
    """
    scored = [r for r in records if holdout_patients is None or r.patient_id in holdout_patients]
    out: dict[str, dict[str, Any]] = {}
    jobs = _jobs(task, records, scored, holdout_patients, fit_records, fit_dir)
    for name, job in jobs.items():
        if precomputed and precomputed.get(name):
            out[name] = precomputed[name]
            continue
        try:
            out[name] = job()
        except (DicomNodeError, ValueError) as exc:
            log.warning("%s baseline %s not scored: %s", task, name, exc)
            out[name] = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the network's evaluation stands without this baseline
            log.warning("%s baseline %s failed: %s: %s", task, name, type(exc).__name__, exc)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def _jobs(task: str, records: Sequence[Record], scored: list[Record], holdout: set[str] | None,
          fit_records: Sequence[Record] | None, fit_dir: Any) -> dict[str, Any]:
    if task == "spine_bmd":
        return {"roi_hu_rule": lambda: spine_rule(scored)}
    if task == "hrpqct_motion":
        from training.clinic_baselines_hrpqct import motion_baseline

        if fit_records is None and fit_dir is not None and holdout is None:
            from training.data import load_records

            fit_records = load_records(fit_dir)

        return {"soft_tissue_ordinal": lambda: motion_baseline(records, holdout_patients=holdout,
                                                               fit_records=fit_records)}
    if task == "knee_bone_seg":
        from training.clinic_baselines_knee import atlas_baseline, threshold_baseline

        return {"coordinate_atlas": lambda: atlas_baseline(scored), "threshold_components":
                lambda: threshold_baseline(scored)}
    if task in ("wrist_fracture", "physis_fracture"):
        from pathlib import Path

        from training import baseline as hb

        def histogram() -> dict[str, Any]:
            if fit_dir is not None and holdout is None:
                return hb.run_baseline(task, list(records), fit_root=Path(fit_dir))
            if holdout:
                return hb.run_baseline(task, list(records), holdout_patients=holdout)
            return hb.run_baseline(task, list(records), folds=min(5, len({r.patient_id for r in records})))

        return {"histogram": histogram}
    return {}


def compare(task: str, network_metrics: dict[str, Any], baselines: dict[str, dict[str, Any]],
            margin: float = MARGIN) -> dict[str, Any] | None:
    """Network vs the strongest scored baseline in the task's comparison metric; None without either figure.

    Returns ``{"metric", "network", "baseline", "baseline_value", "margin", "below_margin"}``.
    """
    if task not in COMPARISON:
        return None
    net_key, base_key = COMPARISON[task]
    net = network_metrics.get(net_key)
    scored = {n: float(b[base_key]) for n, b in baselines.items()
              if "error" not in b and isinstance(b.get(base_key), (int, float)) and math.isfinite(float(b[base_key]))}
    if not isinstance(net, (int, float)) or not math.isfinite(float(net)) or not scored:
        return None
    best = max(scored, key=scored.__getitem__)
    diff = float(net) - scored[best]
    return {"metric": net_key, "network": float(net), "baseline": best, "baseline_metric": base_key,
            "baseline_value": scored[best], "margin": diff, "required_margin": margin, "below_margin": diff < margin}
