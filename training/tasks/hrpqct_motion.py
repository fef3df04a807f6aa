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
from inference.tasks.hrpqct_motion import GRADES, grade_from_expected
from training.adapter import BaseAdapter, EvalResult
from training.data import DataError, Record, Sample
from training.metrics import cohen_kappa
from training.tasks import register_adapter
from training.tasks.hrpqct_metrics import (
    CLASS_NAMES,
    choose_grade_cutpoints,
    choose_rescan_threshold,
    scan_metrics,
)

__all__ = ["ADAPTER", "HrpqctMotionAdapter", "MotionConfig", "MotionEvalResult", "choose_grade_cutpoints",
           "choose_rescan_threshold", "grade_of", "preprocess_record", "scan_metrics"]


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
