"""Training adapter of ``hrpqct_motion``: 5-class motion grading of HR-pQCT slices (Walle et al., Bone 2023).

* **Records are scans, slices are samples.** One manifest row (a study) gives
  the 8 equally spaced slices of its CT series as 8 samples that share the
  scan's grade, so the patient-level split of :mod:`training.data` keeps every
  slice of a scan (and every scan of a patient) in one split.
* **Network**: ``motion_cnn`` (5 blocks conv 3x3 + LeakyReLU + max-pool,
  32-64-128-256-256, global average pooling, dense ReLU, 5-class softmax);
  input 256 x 256 density-normalised slices.
* **Loss**: grade 5 is rare (thesis: 2 of 499 tibia and 8 of 611 radius scans),
  so the default is the ordinal-aware loss (class-weighted cross-entropy plus
  0.5 x |expected grade - grade|) with effective-number class weights from
  ``class_counts`` (default: the thesis' pooled label distribution). Adam, lr 1e-3
  (the trainer's defaults).
* **Scan grade**: mean of the 8 slice probability vectors, then argmax
  (:func:`inference.tasks.hrpqct_motion.aggregate_scan`); rescan when grade >= 4,
  or when ``P(grade >= 4)`` reaches the operating point ``rescan_threshold``.
* **Rescan operating point**: raters disagree on neighbouring grades, so even a
  perfect reader of the motion misses rescan-labelled scans whose rater saw a
  grade 4 in a grade-3 motion (synthetic data: ``generating_grade_*`` metrics).
  With ``rescan_target_sensitivity`` set, :meth:`HrpqctMotionAdapter.tune`
  chooses, after training, the highest ``rescan_threshold`` at which the
  validation split reaches that sensitivity (:func:`choose_rescan_threshold`);
  the bundle records it in ``task_config`` and the node applies it.
* **Evaluation** (scan level): accuracy, macro-F1, quadratic-weighted kappa,
  confusion matrix, rescan sensitivity/specificity (>= 4 vs <= 3) and ROC AUC of
  ``P(grade >= 4)``, sensitivity/specificity at fixed operating points, slice-level
  accuracy, and the Spearman correlation between the projection-space motion
  estimate of the generator (``motion_ssd``, Sode et al. 2011) and the
  predicted grade, with a box/scatter plot (``motion_ssd_vs_grade.png``).

Manifest fields read: the grade from ``grade``, ``motion_grade`` or ``label``
(1-5, or text such as ``"grade 3"``); ``motion_ssd`` (optional, float).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import codes
from inference.bundle import CodedConcept, InputSpec, LabelSpec
from inference.hrpqct import N_SLICES, SLICE_SIZE, DensityNorm, prepare_stack
from inference.hrpqct import input_spec as hrpqct_input_spec
from inference.nets import build_network
from inference.nets.losses import OrdinalGradeLoss, class_weights
from inference.series import group_by_series, read_datasets
from inference.task_settings import THESIS_RADIUS, THESIS_TIBIA, HrpqctMotionSettings
from inference.tasks.hrpqct_motion import (
    GRADES,
    ROUNDING_CUTPOINTS,
    aggregate_scan,
    check_cutpoints,
    grade_from_expected,
    recommends_rescan,
)
from training.adapter import BaseAdapter, EvalResult
from training.data import DataError, Record, Sample
from training.metrics import (
    accuracy,
    cohen_kappa,
    confusion_matrix,
    macro_f1,
    roc_auc,
    sensitivity_specificity,
)
from training.tasks import register_adapter

__all__ = ["ADAPTER", "HrpqctMotionAdapter", "MotionConfig", "MotionEvalResult", "choose_grade_cutpoints",
           "choose_rescan_threshold", "grade_of", "preprocess_record"]

CLASS_NAMES = [f"grade {g}" for g in GRADES]


MotionConfig = HrpqctMotionSettings  # the settings model serving validates bundles with (inference.task_settings)


def grade_of(row: dict[str, Any]) -> int:
    """The 1-5 grade of a manifest row (``grade``, ``motion_grade`` or ``label``).

    Raises
    ------
    DataError
        If there is no grade or it is not 1-5.
    """
    for key in ("grade", "motion_grade", "label"):
        v = row.get(key)
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and float(v).is_integer():
            g = int(v)
        else:
            m = re.fullmatch(r"\s*(?:grade\s*)?([1-5])\s*", str(v), flags=re.IGNORECASE)
            if not m:
                raise DataError(f"manifest {key}={v!r} is not a motion grade 1-5")
            g = int(m.group(1))
        if g not in GRADES:
            raise DataError(f"manifest {key}={v!r} is not a motion grade 1-5")
        return g
    raise DataError("manifest row has no motion grade (grade, motion_grade or label)")


def _motion_ssd(row: dict[str, Any]) -> float:
    v = row.get("motion_ssd")
    try:
        return float(v) if v is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _generating_grade(row: dict[str, Any]) -> int:
    """Synthetic rows: the grade the motion was drawn for (``grade_true``, before rater noise); 0 if absent."""
    v = row.get("grade_true")
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and int(v) in GRADES else 0


def preprocess_record(record: Record, norm: DensityNorm) -> list[Sample]:
    """One scan -> its 8 slice samples ``{"image": (1, 256, 256), "label": grade - 1, "slice", "motion_ssd"}``.

    Raises
    ------
    DataError
        If the record has no CT series with at least 8 slices.
    """
    grade = grade_of(record.row)
    series = [s for s in group_by_series(read_datasets(record.files)).values()
              if s.modality.upper() == "CT" and len(s) >= N_SLICES]
    if not series:
        raise DataError(f"record {record.key}: no CT series with at least {N_SLICES} slices")
    if len(series) > 1:
        raise DataError(f"record {record.key}: {len(series)} CT series; label one scan per row")
    stack, _ = prepare_stack(series[0].volume(), norm)
    ssd = _motion_ssd(record.row)
    return [{"image": stack[i][None].astype(np.float32), "label": grade - 1, "slice": i, "motion_ssd": ssd}
            for i in range(stack.shape[0])]


def _flip(sample: Sample) -> Sample:
    """Random horizontal / vertical flips (motion streaks have no preferred side)."""
    img = sample["image"]
    if torch.rand(()) < 0.5:
        img = torch.flip(img, dims=(-1,))
    if torch.rand(()) < 0.5:
        img = torch.flip(img, dims=(-2,))
    sample["image"] = img
    return sample


@dataclass
class MotionEvalResult(EvalResult):
    """Evaluation plus the per-scan arrays the motion plot needs."""

    motion_ssd: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_grade: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    true_grade: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))


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
        g0 = generating_grade.astype(int) - 1
        g_sens, g_spec = sensitivity_specificity(y_rescan, (generating_grade >= rescan_min_grade).astype(int))
        metrics.update(generating_grade_kappa_quadratic=cohen_kappa(t0, g0, "quadratic", k),
                       generating_grade_accuracy=accuracy(t0, g0), generating_grade_rescan_sensitivity=g_sens,
                       generating_grade_rescan_specificity=g_spec)
    ok = np.isfinite(motion_ssd)
    tables: dict[str, Any] = {}
    if ok.sum() >= 3 and len(np.unique(pred[ok])) > 1 and len(np.unique(motion_ssd[ok])) > 1:
        from scipy.stats import spearmanr

        rho, pval = spearmanr(motion_ssd[ok], pred[ok])
        rho_true, _ = spearmanr(motion_ssd[ok], y_true[ok]) if len(np.unique(y_true[ok])) > 1 else (math.nan, 0)
        metrics.update(motion_ssd_spearman_pred=float(rho), motion_ssd_spearman_pred_p=float(pval),
                       motion_ssd_spearman_true=float(rho_true))
    else:
        metrics.update(motion_ssd_spearman_pred=math.nan, motion_ssd_spearman_true=math.nan)
    if 0 < y_rescan.sum() < y_rescan.size:
        tables["rescan operating points"] = {
            f"P(grade >= {rescan_min_grade}) >= {t:.2f}": dict(zip(
                ("sensitivity", "specificity"),
                sensitivity_specificity(y_rescan, recommends_rescan(pred, p_rescan, rescan_min_grade=rescan_min_grade,
                                                                    rescan_threshold=t).astype(int)),
                strict=True))
            for t in (0.1, 0.2, 0.3, 0.4, 0.5)
        }
    if ok.any():
        tables["motion_ssd by predicted grade"] = {
            f"grade {g}": {"n": int(np.sum(pred[ok] == g)),
                           "median_ssd": float(np.median(motion_ssd[ok][pred[ok] == g])) if np.any(pred[ok] == g)
                           else math.nan}
            for g in GRADES
        }
    return metrics, pred, tables


class HrpqctMotionAdapter(BaseAdapter):
    """Task adapter of ``hrpqct_motion``."""

    name = "hrpqct_motion"
    config_model = MotionConfig
    primary_metric = "kappa_quadratic"
    greater_is_better = True

    def __init__(self) -> None:
        self._criterion: OrdinalGradeLoss | None = None

    def architecture(self, cfg: MotionConfig) -> tuple[str, dict[str, Any]]:
        """``motion_cnn`` with the configured widths."""
        return "motion_cnn", {"in_channels": 1, "num_classes": len(GRADES), "channels": list(cfg.channels),
                              "hidden": cfg.hidden, "negative_slope": cfg.negative_slope,
                              "batch_norm": cfg.batch_norm, "dropout": cfg.dropout}

    def build_model(self, cfg: MotionConfig) -> torch.nn.Module:
        """A freshly initialised motion CNN."""
        arch, init_args = self.architecture(cfg)
        self._criterion = self._loss_fn(cfg)
        return build_network(arch, **init_args)

    def preprocessor(self, cfg: MotionConfig) -> functools.partial[list[Sample]]:
        """Picklable record -> 8 slice samples."""
        return functools.partial(preprocess_record, norm=cfg.norm())

    def preprocess_signature(self, cfg: MotionConfig) -> str:
        """Changes with the pre-processing (slice rule, size, normalisation)."""
        return f"hrpqct_motion:v1:{N_SLICES}:{SLICE_SIZE}:{cfg.norm().to_dict()}"

    def train_transform(self, cfg: MotionConfig):  # noqa: ANN201 - Callable | None
        """Random flips when ``augment``."""
        return _flip if cfg.augment else None

    def _loss_fn(self, cfg: MotionConfig) -> OrdinalGradeLoss:
        weights = None
        if cfg.class_counts is not None and cfg.class_weight_scheme != "none":
            weights = class_weights(cfg.class_counts, cfg.class_weight_scheme, cfg.class_weight_beta)
        return OrdinalGradeLoss(cfg.ordinal_weight if cfg.loss == "ordinal" else 0.0, class_weight=weights)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Ordinal-aware (or plain) class-weighted cross-entropy on slice logits.

        ``loss`` gets no config, so the criterion is built by :meth:`build_model`
        (the trainer always builds the model first); the faithful default otherwise.
        """
        if self._criterion is None:
            self._criterion = self._loss_fn(MotionConfig())
        return self._criterion(outputs.float(), batch["label"].long())

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        """Logits of the batch's slices."""
        return model(self.move(batch, device)["image"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: MotionConfig) -> MotionEvalResult:
        """Scan-level metrics: slice probabilities averaged per record, then the scan rule."""
        probs, labels, recs, ssd = [], [], [], []
        for batch in loader:
            logits = model(batch["image"].to(device)).float()
            probs.append(torch.softmax(logits, dim=1).cpu())
            labels.append(batch["label"])
            recs.append(batch["record_index"])
            ssd.append(batch["motion_ssd"].double())
        p = torch.cat(probs).numpy().astype(np.float64)
        y = torch.cat(labels).numpy().astype(int)
        r = torch.cat(recs).numpy().astype(int)
        s = torch.cat(ssd).numpy()
        ids = np.unique(r)
        mean_probs = np.stack([p[r == i].mean(0) for i in ids])
        y_scan = np.asarray([y[r == i][0] for i in ids]) + 1
        ssd_scan = np.asarray([s[r == i][0] for i in ids])
        records = getattr(loader.dataset, "records", None)
        generating = None
        if records is not None:
            generating = np.asarray([_generating_grade(records[i].row) for i in ids], dtype=int)
        metrics, pred, tables = scan_metrics(y_scan, mean_probs, y, p.argmax(1), ssd_scan,
                                             aggregation=cfg.aggregation, rescan_min_grade=cfg.rescan_min_grade,
                                             rescan_threshold=cfg.rescan_threshold, generating_grade=generating,
                                             cutpoints=cfg.grade_cutpoints)
        return MotionEvalResult(metrics=metrics, y_true=y_scan - 1, y_prob=mean_probs, class_names=CLASS_NAMES,
                                tables=tables, motion_ssd=ssd_scan, pred_grade=pred, true_grade=y_scan)

    def tune(self, result: EvalResult, cfg: MotionConfig) -> tuple[MotionConfig, str]:  # type: ignore[override]
        """Operating points from the validation ``result``: grade cut points, then the rescan threshold.

        With ``tune_grade_cutpoints``: the expected-grade cut points of the highest validation kappa
        (:func:`choose_grade_cutpoints`); the rescan threshold is then chosen on the grades they give.
        """
        if not isinstance(result, MotionEvalResult) or result.y_prob is None:
            return cfg, ""
        notes = []
        pred = result.pred_grade
        if cfg.tune_grade_cutpoints and result.true_grade.size:
            expected = result.y_prob @ np.asarray(GRADES, dtype=np.float64)
            cuts = choose_grade_cutpoints(result.true_grade, expected)
            pred = grade_from_expected(expected, cuts)
            k = len(GRADES)
            before = cohen_kappa(result.true_grade - 1, result.pred_grade - 1, "quadratic", k)
            after = cohen_kappa(result.true_grade - 1, pred - 1, "quadratic", k)
            cfg = cfg.model_copy(update={"grade_cutpoints": cuts})
            notes.append(f"expected-grade cut points {', '.join(f'{c:.3f}' for c in cuts)} chosen on the validation "
                         f"split ({result.true_grade.size} scans; quadratic kappa {before:.3f} -> {after:.3f})")
        cfg, note = self._tune_rescan(result, cfg, pred)
        return cfg, "; ".join(n for n in [*notes, note] if n)

    def _tune_rescan(self, result: MotionEvalResult, cfg: MotionConfig, pred: np.ndarray
                     ) -> tuple[MotionConfig, str]:
        target = cfg.rescan_target_sensitivity
        if target is None or result.y_prob is None:
            return cfg, ""
        p_rescan = result.y_prob[:, cfg.rescan_min_grade - 1:].sum(1)
        n_pos = int(np.sum(result.true_grade >= cfg.rescan_min_grade))
        if n_pos == 0:
            return cfg, (f"rescan operating point not chosen: no validation scan graded >= {cfg.rescan_min_grade}; "
                         f"rescan_threshold stays {cfg.rescan_threshold}")
        t = choose_rescan_threshold(result.true_grade, p_rescan, pred, target=target,
                                    min_grade=cfg.rescan_min_grade)
        where = f"on the validation split ({n_pos} of {result.true_grade.size} scans graded >= {cfg.rescan_min_grade})"
        if t is None:
            return cfg.model_copy(update={"rescan_threshold": None}), (
                f"rescan operating point: the grade rule alone reaches sensitivity >= {target} {where}")
        return cfg.model_copy(update={"rescan_threshold": t}), (
            f"rescan operating point P(grade >= {cfg.rescan_min_grade}) >= {t:.4f}, chosen {where} "
            f"for sensitivity >= {target}")

    def report_plots(self, result: EvalResult, out: Path) -> list[Path]:
        """``motion_ssd_vs_grade.png``: projection-space motion estimate per predicted (and true) grade."""
        if not isinstance(result, MotionEvalResult) or not np.isfinite(result.motion_ssd).any():
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = np.isfinite(result.motion_ssd)
        ssd, pred, true = result.motion_ssd[ok], result.pred_grade[ok], result.true_grade[ok]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        rng = np.random.default_rng(0)
        for ax, grades, title in ((axes[0], pred, "predicted grade"), (axes[1], true, "reference grade")):
            data = [ssd[grades == g] for g in GRADES]
            ax.boxplot([d if d.size else [np.nan] for d in data], positions=list(GRADES), widths=0.5,
                       showfliers=False)
            ax.scatter(grades + rng.uniform(-0.15, 0.15, grades.size), ssd, s=10, alpha=0.6)
            ax.set_xlabel(title)
            ax.set_xticks(list(GRADES))
        axes[0].set_ylabel("SSD of 0/180 degree projections (Sode 2011)")
        rho = result.metrics.get("motion_ssd_spearman_pred")
        fig.suptitle(f"projection-space motion vs grade (Spearman rho, predicted: "
                     f"{rho:.3f})" if isinstance(rho, float) and not math.isnan(rho) else "projection-space motion")
        fig.tight_layout()
        path = Path(out) / "motion_ssd_vs_grade.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    def input_spec(self, cfg: MotionConfig) -> InputSpec:
        """8 slices of 256 x 256, clipped and z-scored density units."""
        norm = cfg.norm()
        return InputSpec(modality=["CT"], size=[SLICE_SIZE, SLICE_SIZE], channels=1, normalisation="zscore",
                         mean=norm.mean, std=norm.std, extra=hrpqct_input_spec(norm))

    def labels(self, cfg: MotionConfig) -> list[LabelSpec]:
        """Grades 1-5 (class indices 0-4) with their codes."""
        return [LabelSpec(name=f"grade {g}", index=g - 1, code=CodedConcept(
            value=codes.MOTION_GRADES[g].value, scheme=codes.MOTION_GRADES[g].scheme,
            meaning=codes.MOTION_GRADES[g].meaning)) for g in GRADES]

    def reference_figures(self) -> dict[str, Any]:
        """The thesis' label distribution and inter-operator agreement (it reports no model results)."""
        return {
            "label_distribution": {"tibia": list(THESIS_TIBIA), "radius": list(THESIS_RADIUS)},
            "operator_full_agreement": 0.51,
            "_notes": ("The source thesis is unfinished and reports no model results; its figures are the label "
                       "distribution (tibia 334/97/42/24/2, radius 139/169/233/62/8 scans for grades 1-5) and the "
                       "full agreement of operators in about 51% of scans. The method is the baseline of Walle et "
                       "al., Bone 2023. Targets for the demo bundle: quadratic-weighted kappa >= 0.80 and rescan "
                       "sensitivity >= 0.90 on a fresh-seed synthetic hold-out."),
        }

    def card_notes(self, cfg: MotionConfig) -> str:
        """Design choices and limits for the model card."""
        return (
            "## Task notes (hrpqct_motion)\n\n"
            f"- Input: {N_SLICES} equally spaced axial slices (centre of each of 8 equal segments), each resized to "
            f"{SLICE_SIZE}x{SLICE_SIZE}, density units clipped to [{cfg.density_low}, {cfg.density_high}] and "
            f"z-scored with mean {cfg.density_mean}, std {cfg.density_std}.\n"
            f"- Scan grade: mean of the slice probability vectors, then {cfg.aggregation}"
            + ("" if cfg.aggregation != "expected" else (
                " grade rounded to the nearest grade" if cfg.grade_cutpoints is None else
                f" grade cut at {', '.join(f'{c:.3f}' for c in cfg.grade_cutpoints)}"
                + (" (chosen on the validation split for the highest quadratic kappa)"
                   if cfg.tune_grade_cutpoints else "")))
            + "; rescan recommended when "
            f"grade >= {cfg.rescan_min_grade}"
            + (f" or P(grade >= {cfg.rescan_min_grade}) >= {cfg.rescan_threshold:.4f} ("
               + (f"operating point chosen on the validation split for sensitivity >= {cfg.rescan_target_sensitivity}"
                  if cfg.rescan_target_sensitivity is not None else "operating point set in the configuration") + ")"
               if cfg.rescan_threshold is not None else "")
            + f"; P(grade >= {cfg.rescan_min_grade}) is reported.\n"
            f"- Loss: {cfg.loss} (weight {cfg.ordinal_weight}), class weights {cfg.class_weight_scheme} from counts "
            f"{list(cfg.class_counts) if cfg.class_counts else None}.\n"
            "- Works on XtremeCT (110 slices, 82 um) and XtremeCT II (168 slices, 61 um) stacks. Grades are "
            "subjective: operators agree fully on only about half of the scans.\n"
        )


ADAPTER = register_adapter(HrpqctMotionAdapter())
