"""Training adapter of ``spine_bmd``: DSNet (Faster R-CNN, ResNet50 + DS attention) on axial lumbar CT slices.

Faithful defaults (Xue et al. 2022): backbone ``resnet50_ds``, SGD with
learning rate 0.01 (momentum 0.9), batch 9, 100 epochs
(:attr:`SpineBmdAdapter.train_config_defaults`). The paper's "dice loss"
cannot apply to Faster R-CNN, whose outputs are boxes and class scores, not
masks: training uses torchvision's standard detection losses (RPN objectness
+ box regression, Fast R-CNN classification + box regression), summed.

Data: each labelled study (manifest row keyed by ``study_uid``) gives its
vertebral-body boxes per SOP instance (``boxes``, ``label`` = class name or
level name) and the class per level (``vertebrae``). The training samples are
those labelled axial slices, bone-windowed (W=2000/L=500) and resized exactly
as in serving (:func:`inference.tasks.spine_bmd.prepare_slice`), plus a few
slices without a vertebral body (intervertebral discs, when the row gives the
levels' extents), so the detector learns not to fire there.

Evaluation runs twice over the hold-out records: slice level (standard
mAP@0.5 and the paper's "Map"/Recall/"Acc", see
:mod:`training.tasks.spine_bmd_eval`) and study level, through the same
pipeline the node runs (:func:`inference.tasks.spine_bmd.analyze_volume`:
profile pass, level labels, detector on the mid-body slices), giving the
per-vertebra macro-F1, Cohen's kappa, per-class sensitivity and the
level-labelling accuracy.

Backbones: ``--backbone resnet50|resnet50_se|resnet50_sk|resnet50_ds`` (or
``--set backbone=...``). ``--set variant=light`` selects the demo bundle's
lighter trunk of the same design (:data:`inference.nets.spine_detector.SPINE_LIGHT_ARGS`).
Parameters (``python -m inference.nets.spine_detector --param-table --light``):

==============  ==========  ===============  ===========  ===============  ==========
backbone        attention   Faster R-CNN     fp16 MB      light: params    light: MB
==============  ==========  ===============  ===========  ===============  ==========
resnet50        0           41,362,531       82.7         5,109,603        10.2
resnet50_se     527,044     41,889,575       83.8         5,118,647        10.2
resnet50_sk     3,167,008   44,529,539       89.1         5,181,475        10.4
resnet50_ds     6,708,360   48,070,891       96.1         5,223,179        10.4
==============  ==========  ===============  ===========  ===============  ==========

The faithful networks exceed the 25 MB fp16 cap of demo bundles; the demo
bundle is the light DS variant (declared in ``bundle.json`` init args and the card).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch

from inference.bundle import CodedConcept, InputSpec, LabelSpec
from inference.ct import BONE_WINDOW_CENTER, BONE_WINDOW_WIDTH
from inference.nets import build_network
from inference.nets.spine_detector import SPINE_LIGHT_ARGS
from inference.series import load_series
from inference.task_settings import SpineBmdSettings
from inference.tasks.spine_bmd import (
    CLASS_CODES,
    SpineParams,
    analyze_volume,
    anterior_is_up,
    prepare_slice,
    slice_positions,
)
from inference.tasks.spine_bmd_levels import CLASS_NAMES, LEVEL_NAMES, REPORTED_LEVELS, decide_class
from training.adapter import BaseAdapter, EvalResult, move_to
from training.data import DataError, Record, Sample
from training.metrics import cohen_kappa, confusion_matrix, macro_f1, sensitivity_specificity
from training.tasks import register_adapter
from training.tasks.spine_bmd_eval import REFERENCE_TABLE1, SliceEval, detection_metrics, level_accuracy

log = logging.getLogger(__name__)

__all__ = ["SpineBmdAdapter", "SpineBmdConfig", "choose_class_offsets", "prepare_record", "study_truth"]


SpineBmdConfig = SpineBmdSettings  # the settings model serving validates bundles with (inference.task_settings)


def choose_class_offsets(y_true: np.ndarray, probs: np.ndarray, *, span: float = 3.0, step: float = 0.05,
                         tolerance: float = 1e-9) -> tuple[float, float, float]:
    """Class log-offsets (normal fixed at 0) with the highest macro-F1 of ``argmax(log p + offsets)``.

    A grid over ``[-span, span]`` for the osteopenia and osteoporosis offsets; among the offsets within
    ``tolerance`` of the best macro-F1, the smallest shift (Euclidean norm) wins, so a split that the plain
    argmax already classifies best keeps offsets of zero. Deterministic.
    """
    y = np.asarray(y_true, dtype=int)
    logp = np.log(np.clip(np.asarray(probs, dtype=float), 1e-12, None))
    k = logp.shape[1]
    grid = np.round(np.arange(-span, span + step / 2, step), 6)
    offsets = [(0.0, float(a), float(b)) for a in grid for b in grid]
    f1 = np.asarray([macro_f1(y, np.argmax(logp + np.asarray(off), axis=1), k) for off in offsets])
    norm = np.asarray([np.hypot(off[1], off[2]) for off in offsets])
    near_best = np.nonzero(f1 >= f1.max() - tolerance)[0]
    return offsets[int(near_best[np.argmin(norm[near_best])])]  # type: ignore[return-value]


# --------------------------------------------------------------------------- ground truth


def _class_index(name: Any) -> int | None:
    if isinstance(name, str) and name.lower() in CLASS_NAMES:
        return CLASS_NAMES.index(name.lower())
    if isinstance(name, int) and 0 <= name < len(CLASS_NAMES):
        return int(name)
    return None


def study_truth(row: dict[str, Any], sop_to_index: dict[str, int], positions: np.ndarray) -> dict[str, Any]:
    """Ground truth of one study row.

    Returns
    -------
    dict
        ``classes`` level -> class index; ``boxes`` slice index -> [(box, class index)];
        ``mid_mm`` level -> true mid-body position (median of its labelled
        slices, or the row's ``levels[level]["z_mm"]``); ``extent_mm`` level ->
        (z0, z1) when the row gives it (``levels[level]`` with ``z0_mm``/``z1_mm``
        or ``slices`` = [first, last] slice index, as the synthetic generator writes).

    Raises
    ------
    DataError
        When a box references an unknown instance or has no class.
    """
    classes: dict[str, int] = {}
    for lv, name in dict(row.get("vertebrae") or {}).items():
        idx = _class_index(name)
        if idx is not None:
            classes[str(lv)] = idx
    boxes: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {}
    level_pos: dict[str, list[float]] = {}
    for b in row.get("boxes") or []:
        sop = str(b.get("sop_instance_uid", ""))
        if sop not in sop_to_index:
            raise DataError(f"study {row.get('study_uid')}: box on unknown instance {sop}")
        i = sop_to_index[sop]
        label = b.get("label")
        level = b.get("level") or b.get("vertebra") or (label if label in LEVEL_NAMES else None)
        cls = _class_index(b.get("class", label))
        if cls is None and level is not None:
            cls = classes.get(str(level))
        if cls is None:
            raise DataError(f"study {row.get('study_uid')}: box without a class ({label!r})")
        boxes.setdefault(i, []).append(((float(b["x0"]), float(b["y0"]), float(b["x1"]), float(b["y1"])), cls))
        if level is not None:
            level_pos.setdefault(str(level), []).append(float(positions[i]))
    mid = {lv: float(np.median(v)) for lv, v in level_pos.items()}
    extent: dict[str, tuple[float, float]] = {}
    for lv, info in dict(row.get("levels") or {}).items():
        if isinstance(info, dict):
            if "z_mm" in info:
                mid[str(lv)] = float(info["z_mm"])
            if "z0_mm" in info and "z1_mm" in info:
                extent[str(lv)] = (float(info["z0_mm"]), float(info["z1_mm"]))
            elif isinstance(info.get("slices"), list) and len(info["slices"]) == 2:  # first/last slice index
                a, b = (int(v) for v in info["slices"])
                if 0 <= a < len(positions) and 0 <= b < len(positions):
                    extent[str(lv)] = (float(positions[a]), float(positions[b]))
    return {"classes": classes, "boxes": boxes, "mid_mm": mid, "extent_mm": extent}


def _load(record: Record) -> tuple[Any, np.ndarray, np.ndarray, dict[str, int]]:
    series = load_series(record.files)
    positions = slice_positions(series)
    sop_to_index = {str(p.ds.SOPInstanceUID): i for i, p in enumerate(series.planes)}
    return series, series.volume(), positions, sop_to_index


def prepare_record(record: Record, *, params: SpineParams, negatives: int, seed: int = 0,
                   pseudo_boxes: bool = False) -> list[Sample]:
    """Labelled slices of one study (plus disc slices without boxes) as detector samples.

    With ``pseudo_boxes``, a row with per-level classes but no boxes gets them from the level finder.
    """
    series, volume, positions, sop_to_index = _load(record)
    row = record.row
    if pseudo_boxes and not row.get("boxes") and row.get("vertebrae"):
        from training.tasks.spine_weak import pseudo_boxes as make_boxes

        sops = sorted(sop_to_index, key=sop_to_index.__getitem__)
        boxes, extents = make_boxes(volume, positions, (float(series.spacing[1]), float(series.spacing[2])), sops,
                                    dict(row["vertebrae"]), cortex_hu=params.cortex_hu,
                                    anterior_up=anterior_is_up(series))
        row = {**row, "boxes": boxes, "levels": row.get("levels") or extents}
    truth = study_truth(row, sop_to_index, positions)
    if not truth["boxes"]:
        raise DataError(f"study {record.key}: no vertebral-body boxes in the manifest row"
                        + ("" if pseudo_boxes else " (per-level classes only: train with --set pseudo_boxes=true)"))
    samples: list[Sample] = []
    chosen = sorted(truth["boxes"])
    if negatives and truth["extent_mm"]:
        inside = np.zeros(len(positions), dtype=bool)
        for z0, z1 in truth["extent_mm"].values():
            inside |= (positions >= min(z0, z1) - 2.0) & (positions <= max(z0, z1) + 2.0)
        lo, hi = min(min(e) for e in truth["extent_mm"].values()), max(max(e) for e in truth["extent_mm"].values())
        gaps = np.nonzero(~inside & (positions > lo) & (positions < hi))[0]
        rng = np.random.default_rng([seed, int(record.key.replace(".", "")[-12:] or 0)])
        if gaps.size:
            chosen += sorted(int(i) for i in rng.choice(gaps, size=min(negatives, gaps.size), replace=False))
    for i in chosen:
        img, scale = prepare_slice(volume[i], params)
        items = truth["boxes"].get(i, [])
        b = np.asarray([bx for bx, _ in items], dtype=np.float32).reshape(-1, 4) * scale
        lab = np.asarray([c + 1 for _, c in items], dtype=np.int64)
        samples.append({"image": img.astype(np.float16), "boxes": b, "labels": lab,
                        "label": int(lab.max()) if lab.size else 0, "slice": int(i)})
    return samples


def augment(sample: Sample, *, hflip: bool, jitter: float) -> Sample:
    """Random left-right flip (boxes follow) and a small brightness/contrast change."""
    img = sample["image"].float()
    boxes = sample["boxes"].clone().float()
    if hflip and torch.rand(()) < 0.5:
        img = torch.flip(img, dims=[-1])
        w = img.shape[-1]
        if boxes.numel():
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    if jitter > 0:
        a = 1.0 + (torch.rand(()) * 2 - 1) * jitter
        c = (torch.rand(()) * 2 - 1) * jitter
        img = torch.clamp(img * a + c, 0.0, 1.0)
    return {**sample, "image": img, "boxes": boxes}


def collate_detection(batch: list[Sample], *, channels: int) -> dict[str, Any]:
    """Images as a list of (C, H, W) float tensors and torchvision targets."""
    images, targets = [], []
    for s in batch:
        img = s["image"].float()[None]
        images.append(img.expand(channels, -1, -1).contiguous() if channels > 1 else img)
        targets.append({"boxes": s["boxes"].float().reshape(-1, 4), "labels": s["labels"].long().reshape(-1)})
    return {"images": images, "targets": targets,
            "record_index": torch.stack([torch.as_tensor(s["record_index"]) for s in batch]),
            "slice": torch.stack([torch.as_tensor(s["slice"]) for s in batch])}


class SpineBmdAdapter(BaseAdapter):
    """DSNet vertebra detector/classifier."""

    name = "spine_bmd"
    config_model = SpineBmdConfig
    primary_metric = "vertebra_macro_f1"
    greater_is_better = True
    #: the paper's optimiser and schedule (SGD, lr 0.01, batch 9, 100 epochs); the demo recipe shortens it
    train_config_defaults: dict[str, Any] = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 9,
                                             "epochs": 100, "weight_decay": 1e-4, "grad_clip": 10.0}

    def architecture(self, cfg: SpineBmdConfig) -> tuple[str, dict[str, Any]]:  # type: ignore[override]
        args: dict[str, Any] = {"backbone": cfg.backbone}
        if cfg.variant == "light":
            args.update(SPINE_LIGHT_ARGS)
        args.update({"in_channels": cfg.in_channels, "min_size": cfg.image_size, "max_size": cfg.image_size,
                     "box_score_thresh": cfg.box_score_thresh})
        if cfg.pretrained_path:
            args["pretrained_path"] = cfg.pretrained_path
        return "spine_detector", args

    def build_model(self, cfg: SpineBmdConfig) -> torch.nn.Module:  # type: ignore[override]
        arch, args = self.architecture(cfg)
        return build_network(arch, **args)

    def preprocessor(self, cfg: SpineBmdConfig) -> Any:  # type: ignore[override]
        return functools.partial(prepare_record, params=cfg.params(), negatives=cfg.negatives_per_study,
                                 pseudo_boxes=cfg.pseudo_boxes)

    def preprocess_signature(self, cfg: SpineBmdConfig) -> str:  # type: ignore[override]
        keys = ("image_size", "negatives_per_study") + (("pseudo_boxes",) if cfg.pseudo_boxes else ())
        return f"spine_bmd-v1:{ {k: getattr(cfg, k) for k in keys} }:{BONE_WINDOW_CENTER}/{BONE_WINDOW_WIDTH}"

    def train_transform(self, cfg: SpineBmdConfig) -> Any:  # type: ignore[override]
        return functools.partial(augment, hflip=cfg.hflip, jitter=cfg.intensity_jitter)

    def collate(self, cfg: SpineBmdConfig) -> Any:  # type: ignore[override]
        return functools.partial(collate_detection, channels=cfg.in_channels)

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        batch = move_to(batch, device)
        return model(batch["images"], batch["targets"])

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Sum of torchvision's RPN and Fast R-CNN losses (see the module docstring for why not Dice)."""
        return sum(outputs.values())  # type: ignore[return-value]

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: SpineBmdConfig) -> EvalResult:  # type: ignore[override]
        slices: list[SliceEval] = []
        for batch in loader:
            outs = model([im.to(device) for im in batch["images"]])
            for k, out in enumerate(outs):
                tgt = batch["targets"][k]
                slices.append(SliceEval(
                    f"{int(batch['record_index'][k])}:{int(batch['slice'][k])}", out["boxes"].float().cpu().numpy(),
                    out["labels"].cpu().numpy(), out["scores"].float().cpu().numpy(), tgt["boxes"].numpy(),
                    tgt["labels"].numpy()))
        metrics: dict[str, Any] = dict(detection_metrics(slices))
        study = self.study_evaluation(model, loader.dataset.records, device, cfg)  # type: ignore[attr-defined]
        metrics.update(study["metrics"])
        tables = {"paper_table1_vs_ours": {
            **{f"paper {k}": {"Map %": v[0], "Recall %": v[1], "Acc %": v[2]} for k, v in REFERENCE_TABLE1.items()},
            f"ours {cfg.backbone} ({cfg.variant})": {"Map %": metrics["paper_map"], "Recall %": metrics["paper_recall"],
                                                     "Acc %": metrics["paper_acc"]},
        }}
        return EvalResult(metrics=metrics, y_true=study["y_true"], y_prob=study["y_prob"],
                          class_names=list(CLASS_NAMES), tables=tables)

    def study_evaluation(self, model: torch.nn.Module, records: list[Record], device: torch.device,
                         cfg: SpineBmdConfig) -> dict[str, Any]:
        """Per-vertebra and level metrics from the serving pipeline on whole studies."""
        params = cfg.params()
        y_true: list[int] = []
        probs: list[np.ndarray] = []
        preds: list[int] = []
        pred_mid: list[dict[str, float]] = []
        true_mid: list[dict[str, float]] = []
        missed = 0
        patient_true: list[int] = []
        patient_pred: list[int] = []
        from training.progress import track

        for rec in track(records, len(records), "spine_bmd study evaluation", "studies"):
            series, volume, positions, sop_to_index = _load(rec)
            truth = study_truth(rec.row, sop_to_index, positions)
            spacing = (float(series.spacing[1]), float(series.spacing[2]))
            analysis = analyze_volume(model, device, volume, positions, spacing, params,
                                      anterior_up=anterior_is_up(series))
            pred_mid.append({r.name: r.center_mm for r in analysis.geometry.runs})
            true_mid.append({lv: z for lv, z in truth["mid_mm"].items() if lv in REPORTED_LEVELS})
            by_level = {v.level: v for v in analysis.vertebrae}
            if analysis.patient is not None and str(rec.row.get("label")) in CLASS_NAMES:
                # the node's patient class (lowest of L1-L4) against the manifest's, the unit the histogram
                # baseline is scored on
                patient_true.append(CLASS_NAMES.index(str(rec.row["label"])))
                patient_pred.append(analysis.patient[0])
            for lv in REPORTED_LEVELS:
                if lv not in truth["classes"]:
                    continue
                v = by_level.get(lv)
                if v is None:
                    missed += 1
                    continue
                y_true.append(truth["classes"][lv])
                probs.append(v.probs)
                preds.append(v.class_index)  # with the bundle's class offsets, as the node decides
        t = np.asarray(y_true, dtype=int)
        p = np.asarray(probs, dtype=float).reshape(-1, len(CLASS_NAMES))
        pred = np.asarray(preds, dtype=int)
        k = len(CLASS_NAMES)
        metrics: dict[str, Any] = {
            "vertebra_macro_f1": macro_f1(t, pred, k) if t.size else float("nan"),
            "vertebra_kappa": cohen_kappa(t, pred, None, k) if t.size else float("nan"),
            "vertebra_accuracy": float(np.mean(t == pred)) if t.size else float("nan"),
            "sensitivity_per_class": {c: sensitivity_specificity(t, pred, i)[0] if t.size else float("nan")
                                      for i, c in enumerate(CLASS_NAMES)},
            "confusion_matrix": confusion_matrix(t, pred, k).tolist(),
            "level_accuracy": level_accuracy(pred_mid, true_mid),
            **_patient_metrics(patient_true, patient_pred, k),
            "vertebrae_evaluated": int(t.size),
            "vertebrae_missed": int(missed),
            "studies": len(records),
        }
        return {"metrics": metrics, "y_true": t, "y_prob": p}

    def tune(self, result: EvalResult, cfg: SpineBmdConfig) -> tuple[SpineBmdConfig, str]:  # type: ignore[override]
        """With ``tune_class_offsets``: class offsets of the highest validation macro-F1 (vertebra level)."""
        if not cfg.tune_class_offsets or result.y_true is None or result.y_prob is None or not len(result.y_true):
            return cfg, ""
        y, p = np.asarray(result.y_true, dtype=int), np.asarray(result.y_prob, dtype=float)
        k = len(CLASS_NAMES)
        before = macro_f1(y, decide_class(p, cfg.class_log_offsets), k)
        offsets = choose_class_offsets(y, p)
        after = macro_f1(y, decide_class(p, offsets), k)
        note = (f"class log-offsets {', '.join(f'{o:+.2f}' for o in offsets)} chosen on the validation split "
                f"({y.size} vertebrae; macro-F1 {before:.3f} -> {after:.3f})")
        return cfg.model_copy(update={"class_log_offsets": offsets}), note

    def input_spec(self, cfg: SpineBmdConfig) -> InputSpec:  # type: ignore[override]
        return InputSpec(modality=["CT"], size=[cfg.image_size, cfg.image_size], channels=cfg.in_channels,
                         window=(BONE_WINDOW_CENTER, BONE_WINDOW_WIDTH), normalisation="window",
                         extra={"pipeline": "inference.tasks.spine_bmd with the task_config settings (SpineBmdSettings)"})

    def labels(self, cfg: SpineBmdConfig) -> list[LabelSpec]:  # type: ignore[override]
        return [LabelSpec(name=n, index=i + 1, code=CodedConcept(value=c.value, scheme=c.scheme, meaning=c.meaning))
                for i, (n, c) in enumerate(zip(CLASS_NAMES, CLASS_CODES, strict=True))]

    def reference_figures(self) -> dict[str, Any]:
        ds = REFERENCE_TABLE1["resnet50_ds"]
        return {
            "paper_map": ds[0], "paper_recall": ds[1], "paper_acc": ds[2],
            "_notes": ("Xue et al. 2022, Table 1 (\"Map\"/Recall/\"Acc\" in %, the paper's own definitions "
                       "\"Map\" = TP/(N(TP+FP)), \"Acc\" = TP/(TP+TN+FN); 4,805 axial images of 133 patients, "
                       "DXA T-score classes): ResNet50 78.2/88.1/74.1, +SE 80.4/88.5/73.7, +SK 81.4/89.2/73.8, "
                       "+DS 83.4/90.0/75.9 (a single evaluation's report shows the DS row as its 'source document' "
                       "column). The paper reports no standard mAP, macro-F1, kappa or level-labelling accuracy."),
        }

    def variant_of(self, task_config: dict[str, Any]) -> str:
        """Backbone and variant (``resnet50_ds (light)``)."""
        return f"{task_config.get('backbone', '?')} ({task_config.get('variant', '?')})"

    def comparison_columns(self) -> list[str]:
        """Standard metrics, then the paper's own (Table 1)."""
        return ["map50", "sensitivity_per_class.normal", "sensitivity_per_class.osteopenia",
                "sensitivity_per_class.osteoporosis", "vertebra_macro_f1", "vertebra_kappa", "patient_macro_f1",
                "level_accuracy",
                "paper_map", "paper_recall", "paper_acc"]

    def reference_rows(self) -> dict[str, dict[str, Any]]:
        """Xue et al. 2022, Table 1: the paper's "Map" / Recall / "Acc" (%) of the four backbones."""
        return {f"paper {k}": {"paper_map": v[0], "paper_recall": v[1], "paper_acc": v[2]}
                for k, v in REFERENCE_TABLE1.items()}

    def card_notes(self, cfg: SpineBmdConfig) -> str:
        variant = ("Light demo variant of the same design: "
                   f"{SPINE_LIGHT_ARGS} (ResNet18 trunk without layer4, attention after the stem and the last "
                   "kept stage), declared here and in bundle.json init_args.\n\n" if cfg.variant == "light" else "")
        return (
            "## Task notes\n\n"
            f"- Backbone `{cfg.backbone}` ({cfg.variant}); Faster R-CNN with FPN; classes normal / osteopenia / "
            "osteoporosis (WHO T-score classes).\n"
            f"- {variant}"
            "- Loss: torchvision's RPN + Fast R-CNN losses. The paper's \"dice loss\" applies to masks, which a box "
            "detector does not output.\n"
            "- Levels L1-L5 come from a cortical-bone profile along the stack, anchored at the sacrum; only the "
            f"{cfg.slices_per_vertebra} mid-body slices of each of L1-L4 go through the detector.\n"
            "- Vertebra class: argmax of the mean class distribution over its mid-body slices"
            + (f" plus the class log-offsets {', '.join(f'{o:+.2f}' for o in cfg.class_log_offsets)} "
               "(normal, osteopenia, osteoporosis; an operating point chosen on the validation split)"
               if cfg.class_log_offsets is not None else "") + ".\n"
            "- Patient-level class: the lowest of L1-L4 (DXA convention).\n"
            + ("- Weak labels: studies with per-level classes but no boxes were trained on **pseudo-boxes** from the "
               "level finder (training/tasks/spine_weak.py), not on drawn boxes (task_config.pseudo_boxes).\n"
               if cfg.pseudo_boxes else "")
        )


def _patient_metrics(y_true: list[int], y_pred: list[int], k: int) -> dict[str, float]:
    """Patient-level macro-F1 and quadratic kappa (NaN without studies that have a patient class)."""
    if not y_true:
        return {"patient_macro_f1": float("nan"), "patient_kappa_quadratic": float("nan")}
    return {"patient_macro_f1": macro_f1(y_true, y_pred, k),
            "patient_kappa_quadratic": cohen_kappa(y_true, y_pred, "quadratic", k)}


register_adapter(SpineBmdAdapter())
