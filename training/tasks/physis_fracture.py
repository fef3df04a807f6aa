"""Training adapter of ``physis_fracture``: two-stage detector + crop classifier, and both baselines.

One bundle (architecture ``physis_two_stage``) holds every sub-network the
method needs; they are trained jointly on the same split with one summed loss:

* detector (Faster R-CNN ResNet50-FPN, faithful; light variant for demo
  bundles) on the letterboxed image (long side ``det_long_side`` >= 1024),
  boxes for fracture (1), metal (2) and text (3) from the manifest;
* crop classifier (ResNet50) on full-resolution crops with margin: jittered
  ground-truth fracture boxes (positives), metal/text boxes and random boxes
  on the anatomy (negatives);
* whole-image classifier (ResNet50) on the letterboxed image (the two-stage
  fallback when nothing is detected, and the classifier baseline).

``method`` selects what is built and served: ``two_stage`` (default, the
thesis's winner; the bundle then also scores both baselines, so ``evaluate``
prints all three methods in one table), ``classifier`` or ``detector``.

Evaluation runs the serving code (:func:`inference.tasks.physis_fracture.score_image`)
on the source images of each record, so the numbers are those of the node. The
samples (manifest labels, inputs, crops) are made in :mod:`training.tasks.physis_samples`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from inference.bundle import CodedConcept, InputSpec, LabelSpec
from inference.codes import GROWTH_PLATE_FRACTURE
from inference.nets import build_network
from inference.radiograph import MEAN, STD, to_float
from inference.task_settings import PhysisFractureSettings
from inference.tasks.physis_fracture import ImageInputs, score_image
from inference.tasks.physis_fracture_post import LABEL_NAMES
from training.adapter import BaseAdapter, EvalResult
from training.metrics import (
    BoxPrediction,
    accuracy,
    accuracy_threshold,
    aggregate_by_group,
    bootstrap_ci,
    confusion_matrix,
    froc,
    mean_average_precision,
    roc_auc,
    sensitivity_specificity,
)
from training.tasks import register_adapter
from training.tasks.physis_samples import (
    collate_with_weights,
    flip_sample,
    letterbox_crops,
    mine_proposals,
    prepare_record,
)

log = logging.getLogger(__name__)

__all__ = ["PhysisFractureAdapter", "PhysisFractureConfig", "method_metrics"]


#: thesis figures (Graz paediatric radiology, 21,557 images; validation set of 1,475 images without a
#: patient-level split): accuracy only.
THESIS_ACCURACY = {
    "two_stage": 0.809,  # SpineNet-49 RetinaNet + ShapeMask detector, crops to a classifier
    "custom CNN": 0.746,
    "detector (SpineNet RetinaNet)": 0.733,
    "detector": 0.718,  # Faster R-CNN
    "classifier": 0.691,  # whole-image ResNet50
    "MobileNetV2 (collapsed, NaN loss)": 0.461,
}
REFERENCE = {
    "accuracy": 0.809,
    "two_stage_accuracy": 0.809,
    "detector_accuracy": 0.718,
    "classifier_accuracy": 0.691,
    "_notes": ("Thesis (Graz paediatric radiology, 21,557 images, 47.1% fractured): image accuracy on a validation "
               "set of 1,475 images without a patient-level split: two-stage 80.9%, custom CNN 74.6%, SpineNet "
               "detector 73.3%, Faster R-CNN 71.8%, whole-image ResNet50 69.1%; MobileNetV2 46.1% was a collapsed "
               "model with NaN loss. The thesis reports no sensitivity, specificity, AUC, mAP or FROC; ours are "
               "image-level on the locked patient-level hold-out split."),
}


PhysisFractureConfig = PhysisFractureSettings  # the settings model serving validates bundles with (inference.task_settings)


def method_metrics(y: np.ndarray, scores: np.ndarray, *, threshold: float, n_boot: int) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity (at ``threshold``) and AUC with a bootstrap 95% CI."""
    y = np.asarray(y).astype(int)
    s = np.asarray(scores, dtype=float)
    pred = (s >= threshold).astype(int)
    sens, spec = sensitivity_specificity(y, pred)
    auc, lo, hi = bootstrap_ci(roc_auc, y, s, n_boot=n_boot) if n_boot else (roc_auc(y, s), float("nan"),
                                                                             float("nan"))
    return {"accuracy": accuracy(y, pred), "sensitivity": sens, "specificity": spec, "auc": auc,
            "auc_ci95": [lo, hi], "confusion_matrix": confusion_matrix(y, pred, 2).tolist()}


def _detector_metrics(preds: list[BoxPrediction], gts: dict[str, list[tuple[tuple[float, ...], int]]], n_images: int,
                      metrics: dict[str, Any], table: dict[str, dict[str, Any]]) -> None:
    """Add the detector's mAP@0.5 (all classes) and fracture FROC to ``metrics`` and the method ``table``."""
    mp = mean_average_precision(preds, gts, 0.5)
    metrics["detector_map50"] = mp["map"]
    metrics["detector_ap50_per_class"] = {LABEL_NAMES.get(k, str(k)): v for k, v in mp["ap_per_class"].items()}
    frac_gt = {k: np.asarray([b for b, lab in v if lab == 1], dtype=float).reshape(-1, 4) for k, v in gts.items()}
    fr = froc([p for p in preds if p.label == 1], frac_gt, n_images)
    metrics["detector_froc_mean_sensitivity"] = fr["mean_sensitivity"]
    metrics["detector_froc"] = {"fps_per_image": fr["fps_per_image"], "sensitivity": fr["sensitivity"]}
    for name in ("detector", "two_stage"):
        if name in table:
            table[name]["map50"] = mp["map"]
            table[name]["froc_mean_sensitivity"] = fr["mean_sensitivity"]


def _read_source(path: Any) -> np.ndarray:
    return to_float(pydicom.dcmread(path))


class PhysisFractureAdapter(BaseAdapter):
    """Two-stage growth-plate fracture model (and its baselines) for paediatric radiographs."""

    name = "physis_fracture"
    config_model = PhysisFractureConfig
    primary_metric = "auc"
    greater_is_better = True

    #: TrainConfig values of this task (from-scratch training of a detector needs a small LR and clipping)
    train_config_defaults: dict[str, Any] = {"batch_size": 8, "optimizer": "adamw", "lr": 3e-4,
                                             "weight_decay": 1e-4, "grad_clip": 10.0, "schedule": "cosine"}

    def architecture(self, cfg: PhysisFractureConfig) -> tuple[str, dict[str, Any]]:  # type: ignore[override]
        """``physis_two_stage`` with the sub-networks of the method and variant.

        The post-processing rules are not network arguments: serving reads them from the bundle's
        ``task_config`` (these settings, :meth:`PhysisFractureSettings.post_config`).
        """
        from inference.nets.physis_two_stage import physis_init_args

        return "physis_two_stage", physis_init_args(
            cfg.method, variant=cfg.variant, kind=cfg.detector_kind, det_long_side=cfg.det_long_side,
            image_size=cfg.image_size, crop_size=cfg.crop_size)

    def build_model(self, cfg: PhysisFractureConfig) -> torch.nn.Module:  # type: ignore[override]
        """A freshly initialised composite model."""
        arch, args = self.architecture(cfg)
        return build_network(arch, **args)

    def preprocessor(self, cfg: PhysisFractureConfig) -> Any:  # type: ignore[override]
        """Picklable ``record -> samples`` (one per image)."""
        post = cfg.post_config()
        return functools.partial(prepare_record, det_long_side=cfg.det_long_side, image_size=cfg.image_size,
                                 crop_size=cfg.crop_size, crops_per_image=cfg.crops_per_image,
                                 crop_jitter=cfg.crop_jitter, crop_margin=post.crop_margin,
                                 crop_min_side=post.crop_min_side)

    def patch_preprocessor(self, cfg: PhysisFractureConfig) -> Any:
        """Picklable ``record -> patch sources`` of the method's networks (:mod:`training.tasks.physis_patches`)."""
        from training.tasks.physis_patches import patch_sources, views_of

        return functools.partial(patch_sources, views=views_of(cfg.method), det_long_side=cfg.det_long_side,
                                 image_size=cfg.image_size, crop_size=cfg.crop_size,
                                 crop_extent=cfg.patch_crop_extent)

    def patch_views(self, model: torch.nn.Module, cfg: PhysisFractureConfig) -> dict[str, Any]:
        """Each sub-network with its patch side, for box-patch pretraining."""
        from training.tasks.physis_patches import patch_views

        return patch_views(model, det_long_side=cfg.det_long_side, image_size=cfg.image_size,
                           crop_size=cfg.crop_size)

    def preprocess_signature(self, cfg: PhysisFractureConfig) -> str:  # type: ignore[override]
        """Changes with every field that alters the cached samples."""
        post = cfg.post_config()
        keys = ("det_long_side", "image_size", "crop_size", "crops_per_image", "crop_jitter")
        return "physis_fracture/v3:" + repr({k: getattr(cfg, k) for k in keys}) + repr(
            (post.crop_margin, post.crop_min_side))

    def train_transform(self, cfg: PhysisFractureConfig) -> Any:  # type: ignore[override]
        """Horizontal flip (p = ``hflip_p``) of every input of a sample."""
        return functools.partial(flip_sample, p=cfg.hflip_p)

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        """Training forward of the sub-networks the method has: detector loss dict and classifier logits."""
        net = getattr(model, "module", model)
        out: dict[str, Any] = {}
        if net.detector is not None:
            images = [t.float() for t in batch["det"]]
            targets = []
            for boxes, labels in zip(batch["det_boxes"], batch["det_labels"], strict=True):
                keep = labels > 0
                targets.append({"boxes": boxes[keep].float(), "labels": labels[keep]})
            out["det"] = net.detector(images, targets)
        if net.image_classifier is not None:
            out["image"] = net.image_classifier(batch["image"].float())
        if net.crop_classifier is not None:
            out["crop"] = net.crop_classifier(batch["crops"].flatten(0, 1).float())
            mining = batch.get("mining")
            if net.detector is not None and mining is not None and float(mining[0]) > 0:
                enabled, per_image, iou_thr, margin, min_side, size = mining.tolist()
                boxes, labels = mine_proposals(net.detector, images, batch["det_boxes"], batch["det_labels"],
                                               per_image=int(per_image), iou_thr=iou_thr)
                crops = letterbox_crops(torch.stack(images), boxes, margin=margin, min_side=min_side, size=int(size))
                if len(crops):
                    out["mined"] = net.crop_classifier(crops)
                    out["mined_labels"] = labels
        return out

    def collate(self, cfg: PhysisFractureConfig) -> Any:  # type: ignore[override]
        """torch's default collate plus the loss weights (det, crop, image) as ``loss_weights``."""
        post = cfg.post_config()
        mining = (float(cfg.mine_crops), cfg.mined_per_image, cfg.mine_iou, post.crop_margin, post.crop_min_side,
                  cfg.crop_size)
        return functools.partial(collate_with_weights, weights=(cfg.det_loss_weight, cfg.crop_loss_weight,
                                                                cfg.image_loss_weight), mining=mining)

    def loss(self, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        """Weighted sum: detector losses + crop BCE + whole-image BCE (weights from ``batch["loss_weights"]``)."""
        w_det, w_crop, w_img = (batch["loss_weights"].tolist() if "loss_weights" in batch else (1.0, 1.0, 1.0))
        total = torch.zeros((), device=batch["label"].device)
        if "det" in outputs:
            total = total + w_det * sum(v.float() for v in outputs["det"].values())
        if "image" in outputs:
            total = total + w_img * F.binary_cross_entropy_with_logits(outputs["image"][:, 0].float(),
                                                                       batch["label"].float())
        if "crop" in outputs:
            logits, target = outputs["crop"][:, 0].float(), batch["crop_labels"].flatten().float()
            if "mined" in outputs:
                logits = torch.cat([logits, outputs["mined"][:, 0].float()])
                target = torch.cat([target, outputs["mined_labels"].to(target)])
            total = total + w_crop * F.binary_cross_entropy_with_logits(logits, target)
        return total

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: PhysisFractureConfig) -> EvalResult:  # type: ignore[override]
        """Image-level metrics of every method the model scores, detector mAP@0.5 and FROC.

        Each image is scored by the serving code (:func:`score_image`) on the cached letterboxed inputs; the
        crops come from the full-resolution source image, read when the detector proposes a fracture.
        """
        records = loader.dataset.records
        post = cfg.post_config()  # the rules serving applies (task settings, with a tuned threshold)
        labels, rec_ids, per_method = [], [], {}
        preds: list[BoxPrediction] = []
        gts: dict[str, list[tuple[tuple[float, ...], int]]] = {}
        for batch in loader:
            for i in range(len(batch["label"])):
                ri, ii = int(batch["record_index"][i]), int(batch["image_index"][i])
                key = f"{ri}:{ii}"
                inputs = ImageInputs(batch["det"][i].float(), batch["det_to_source"][i].double().numpy(),
                                     batch["image"][i].float(), tuple(int(v) for v in batch["source_shape"][i]))
                path = sorted(records[ri].files)[ii]
                result = score_image(model, functools.partial(_read_source, path), device, post, inputs=inputs)
                for name, value in result.by_method().items():
                    per_method.setdefault(name, []).append(value)
                labels.append(int(batch["label"][i]))
                rec_ids.append(ri)
                valid = batch["det_labels"][i] > 0
                gts[key] = [(tuple(float(v) for v in b), int(lab)) for b, lab in
                            zip(batch["src_boxes"][i][valid].tolist(), batch["det_labels"][i][valid].tolist(),
                                strict=True)]
                if result.detections is not None:
                    b, lab, s = result.detections
                    preds.extend(BoxPrediction(key, tuple(map(float, bb)), int(ll), float(ss))
                                 for bb, ll, ss in zip(b, lab, s, strict=True))
        y = np.asarray(labels, dtype=int)
        metrics: dict[str, Any] = {"n_images": int(len(y)), "prevalence": float(y.mean()) if len(y) else float("nan"),
                                   "threshold": post.threshold, "method": getattr(model, "method", cfg.method)}
        table: dict[str, dict[str, Any]] = {}
        for name, values in per_method.items():
            mm = method_metrics(y, np.asarray(values), threshold=post.threshold, n_boot=cfg.n_boot)
            for k, v in mm.items():
                metrics[f"{name}_{k}"] = v
            table[name] = {"accuracy": mm["accuracy"], "sensitivity": mm["sensitivity"],
                           "specificity": mm["specificity"], "auc": mm["auc"], "auc_ci95_low": mm["auc_ci95"][0],
                           "auc_ci95_high": mm["auc_ci95"][1], "thesis_accuracy": THESIS_ACCURACY.get(name, "-")}
        method = metrics["method"]
        for k in ("accuracy", "sensitivity", "specificity", "auc", "auc_ci95", "confusion_matrix"):
            metrics[k] = metrics[f"{method}_{k}"]
        scores = np.asarray(per_method[method])
        _, st_y = aggregate_by_group(y, rec_ids, "max")
        _, st_s = aggregate_by_group(scores, rec_ids, "max")
        metrics["study_auc"] = roc_auc(st_y.astype(int), st_s)
        metrics["study_accuracy"] = accuracy(st_y.astype(int), (st_s >= post.threshold).astype(int))
        if any(m in per_method for m in ("detector", "two_stage")) and getattr(model, "detector", None) is not None:
            _detector_metrics(preds, gts, len(y), metrics, table)
        for name, acc in THESIS_ACCURACY.items():
            if name not in table:
                table[f"thesis only: {name}"] = {"thesis_accuracy": acc}
        return EvalResult(metrics=metrics, y_true=y, y_prob=scores, class_names=["no fracture", "fracture"],
                          tables={"methods (image level, ours vs thesis accuracy)": table})

    def tune(self, result: EvalResult, cfg: PhysisFractureConfig) -> tuple[PhysisFractureConfig, str]:  # type: ignore[override]
        """With ``tune_threshold``: the image threshold of the highest validation accuracy (served method)."""
        if not cfg.tune_threshold or result.y_prob is None or len(np.unique(result.y_true)) < 2:
            return cfg, ""
        before = cfg.post_config().threshold
        thr, acc = accuracy_threshold(result.y_true, result.y_prob)
        thr = float(np.clip(thr, 0.0, 1.0))
        was = accuracy(result.y_true, (np.asarray(result.y_prob) >= before).astype(int))
        return cfg.model_copy(update={"operating_threshold": thr}), (
            f"image threshold {thr:.3f} chosen on the validation split ({len(result.y_true)} images; accuracy "
            f"{was:.3f} at {before:.2f} -> {acc:.3f})")

    def input_spec(self, cfg: PhysisFractureConfig) -> InputSpec:  # type: ignore[override]
        """DX/CR radiographs, letterboxed squares for detector and classifier."""
        return InputSpec(modality=["DX", "CR"], size=[cfg.det_long_side, cfg.det_long_side], channels=1,
                         normalisation="zscore", mean=MEAN, std=STD,
                         extra={"pipeline": "inference.radiograph (to_float, letterbox black, no crop)",
                                "image_size": cfg.image_size, "crop_size": cfg.crop_size,
                                "detector_pixels": "[0, 1], normalised inside the detector (mean 0.5, std 0.25)"})

    def labels(self, cfg: PhysisFractureConfig) -> list[LabelSpec]:  # type: ignore[override]
        """Detector classes (1 fracture, 2 metal, 3 text); only fracture is ever reported."""
        frac = CodedConcept(value=GROWTH_PLATE_FRACTURE.value, scheme=GROWTH_PLATE_FRACTURE.scheme,
                            meaning=GROWTH_PLATE_FRACTURE.meaning)
        return [LabelSpec(name="fracture", index=1, code=frac), LabelSpec(name="metal", index=2),
                LabelSpec(name="text", index=3)]

    def reference_figures(self) -> dict[str, Any]:
        """Thesis accuracies (image level) beside ours."""
        return dict(REFERENCE)

    def card_notes(self, cfg: PhysisFractureConfig) -> str:
        """Design choices and limits for the model card."""
        post = cfg.post_config()
        light = ("**Light variant** (demo bundle): ResNet18 trunks without layer4 for the detector (FPN 128, box "
                 "head 256) and both classifiers, the same design as the faithful ResNet50 configuration, to stay "
                 "under the 25 MB fp16 cap.\n\n" if cfg.variant == "light" else "")
        return (
            f"## Physis fracture model\n\n{light}- Method: `{cfg.method}`; detector `{cfg.detector_kind}`, input "
            f"{cfg.det_long_side} px square letterbox; whole-image classifier {cfg.image_size} px; crops "
            f"{cfg.crop_size} px from the full-resolution source with margin {post.crop_margin}.\n"
            f"- Post-processing: detector score >= {post.det_score_thresh}, per-class NMS IoU {post.nms_iou}, "
            f"fracture boxes covered >= {post.distractor_overlap} by a metal/text box of higher score dropped, top "
            f"{post.top_k} boxes; box score sqrt(detector score x crop probability), image score the maximum, "
            f"whole-image classifier when nothing is detected; positive at >= {post.threshold}.\n"
            "- Metal and text boxes are detected to be excluded and are never reported as fractures.\n"
            "- Salter-Harris typing is out of scope (no labels); the result has no type.\n"
            "- Trained from scratch (no ImageNet weights are downloaded); the thesis used pretrained networks.\n"
        )


register_adapter(PhysisFractureAdapter())
