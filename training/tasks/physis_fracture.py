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
on the source images of each record, so the numbers are those of the node.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F

from inference.bundle import CodedConcept, InputSpec, LabelSpec
from inference.codes import GROWTH_PLATE_FRACTURE
from inference.nets import build_network
from inference.radiograph import MEAN, STD, crop_with_margin, detector_input, to_float
from inference.task_settings import PhysisFractureSettings
from inference.tasks.physis_fracture import ImageInputs, score_image
from inference.tasks.physis_fracture_post import LABEL_NAMES
from training.adapter import BaseAdapter, EvalResult
from training.data import Record, Sample
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

log = logging.getLogger(__name__)

__all__ = ["PhysisFractureAdapter", "PhysisFractureConfig", "image_boxes", "image_label", "method_metrics",
           "prepare_record", "source_images"]

MAX_BOXES = 16
_LABEL_IDS = {name: idx for idx, name in LABEL_NAMES.items()}
_POSITIVE_WORDS = {"1", "true", "yes", "fracture", "fractured", "positive", "present"}

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


def _positive(value: Any) -> int:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return int(float(value) > 0.5)
    return int(str(value).strip().lower() in _POSITIVE_WORDS)


def image_boxes(row: dict[str, Any], sop_uid: str) -> list[tuple[tuple[float, float, float, float], int]]:
    """(box, label id) of one image from the manifest row; labels other than fracture/metal/text are ignored."""
    out = []
    for b in row.get("boxes") or []:
        if str(b.get("sop_instance_uid", sop_uid)) != sop_uid:
            continue
        lab = _LABEL_IDS.get(str(b.get("label", "fracture")).lower())
        if lab is None:
            continue
        box = (float(b["x0"]), float(b["y0"]), float(b["x1"]), float(b["y1"]))
        if box[2] > box[0] and box[3] > box[1]:
            out.append((box, lab))
    return out


def image_label(row: dict[str, Any], sop_uid: str) -> int:
    """Image label: ``image_labels[sop]`` if given; an instance row's label; else study label and a fracture box.

    A positive study whose rows give no fracture box at all labels every image positive
    (no localisation); otherwise an image is positive only if a fracture box lies on it.
    """
    per_image = row.get("image_labels")
    if isinstance(per_image, dict) and sop_uid in per_image:
        return _positive(per_image[sop_uid])
    if row.get("sop_instance_uid"):
        return _positive(row.get("label", 0))
    study = _positive(row.get("label", 0))
    fracture_boxes = [b for b in row.get("boxes") or [] if str(b.get("label", "fracture")).lower() == "fracture"]
    if not study:
        return 0
    if not fracture_boxes:
        return 1
    return int(any(str(b.get("sop_instance_uid")) == sop_uid for b in fracture_boxes))


def _jitter(box: tuple[float, ...], rng: np.random.Generator, amount: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2 + rng.uniform(-amount, amount) * w
    cy = (y0 + y1) / 2 + rng.uniform(-amount, amount) * h
    s = float(np.exp(rng.uniform(-amount, amount)))
    return cx - w * s / 2, cy - h * s / 2, cx + w * s / 2, cy + h * s / 2


def _random_box(image: np.ndarray, rng: np.random.Generator, avoid: list[tuple[float, ...]]) -> tuple[float, ...]:
    """A random box on the anatomy (bright half of the image) not overlapping ``avoid``."""
    rows, cols = image.shape
    fg = np.argwhere(image > np.quantile(image, 0.5))
    box: tuple[float, ...] = (0.0, 0.0, float(cols), float(rows))
    for _ in range(20):
        side = rng.uniform(0.08, 0.25) * min(rows, cols)
        r, c = fg[rng.integers(len(fg))] if len(fg) else (rng.uniform(0, rows), rng.uniform(0, cols))
        box = (max(0.0, c - side / 2), max(0.0, r - side / 2), min(float(cols), c + side / 2),
               min(float(rows), r + side / 2))
        if all(not (box[0] < a[2] and a[0] < box[2] and box[1] < a[3] and a[1] < box[3]) for a in avoid):
            break
    return box


def source_images(record: Record) -> Iterator[tuple[int, str, np.ndarray]]:
    """(index among the record's sorted files, SOP Instance UID, [0, 1] source image) of each image it covers."""
    for index, path in enumerate(sorted(record.files)):
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        if record.level == "instance" and str(ds.SOPInstanceUID) != record.key:
            continue
        yield index, str(ds.SOPInstanceUID), to_float(ds)


def prepare_record(record: Record, *, det_long_side: int, image_size: int, crop_size: int, crops_per_image: int,
                   crop_jitter: float, crop_margin: float, crop_min_side: int) -> list[Sample]:
    """One sample per image of a record: detector input + boxes, whole-image input, training crops, label.

    Boxes are padded to :data:`MAX_BOXES` (label 0 = padding). Crops are
    deterministic per image (seeded by the SOP Instance UID): up to half are
    jittered fracture boxes (label 1), the rest metal/text boxes and random
    boxes on the anatomy (label 0).
    """
    samples: list[Sample] = []
    for index, sop, image in source_images(record):
        gt = image_boxes(record.row, sop)
        det = detector_input(image, long_side=det_long_side)
        cls = detector_input(image, long_side=image_size)
        det_boxes = np.zeros((MAX_BOXES, 4), np.float32)
        src_boxes = np.zeros((MAX_BOXES, 4), np.float32)
        det_labels = np.zeros(MAX_BOXES, np.int64)
        m = det.source_to_model
        for k, (box, lab) in enumerate(gt[:MAX_BOXES]):
            # box edges: pixel-index box (x0..x1 inclusive centres) -> edges at -0.5/+0.5
            p0 = m @ np.array([box[0] - 0.5, box[1] - 0.5, 1.0])
            p1 = m @ np.array([box[2] + 0.5, box[3] + 0.5, 1.0])
            det_boxes[k] = [p0[0], p0[1], p1[0], p1[1]]
            src_boxes[k] = box
            det_labels[k] = lab
        rng = np.random.default_rng(int.from_bytes(sop.encode()[-8:].rjust(8, b"\0"), "big") % 2**63)
        fractures = [b for b, lab in gt if lab == 1]
        distractors = [b for b, lab in gt if lab != 1]
        crop_boxes: list[tuple[float, ...]] = []
        crop_labels: list[float] = []
        n_pos = min(len(fractures) and max(1, crops_per_image // 2), crops_per_image)
        for k in range(n_pos):
            crop_boxes.append(_jitter(fractures[k % len(fractures)], rng, crop_jitter))
            crop_labels.append(1.0)
        for b in distractors:
            if len(crop_boxes) >= crops_per_image:
                break
            crop_boxes.append(b)
            crop_labels.append(0.0)
        while len(crop_boxes) < crops_per_image:
            crop_boxes.append(_random_box(image, rng, fractures))
            crop_labels.append(0.0)
        crops = np.stack([crop_with_margin(image, b, margin=crop_margin, min_side=crop_min_side,
                                           out_size=crop_size).tensor.numpy() for b in crop_boxes])
        det_pixels = np.clip(det.tensor.numpy() * det.std + det.mean, 0.0, 1.0)
        samples.append({
            "det": det_pixels.astype(np.float16), "det_boxes": det_boxes, "det_labels": det_labels,
            "src_boxes": src_boxes, "image": cls.tensor.numpy().astype(np.float16),
            "crops": crops.astype(np.float16), "crop_labels": np.asarray(crop_labels, np.float32),
            "det_to_source": np.linalg.inv(det.source_to_model), "source_shape": np.asarray(image.shape, np.int64),
            "label": np.int64(image_label(record.row, sop)), "image_index": np.int64(index),
        })
    return samples


def flip_sample(sample: Sample, *, p: float = 0.5) -> Sample:
    """Horizontal flip (probability ``p``) of the detector image with its boxes, the whole image and the crops."""
    if float(torch.rand(())) >= p:
        return sample
    out = dict(sample)
    det = sample["det"]
    width = det.shape[-1]
    out["det"] = torch.flip(det, dims=[-1])
    boxes = sample["det_boxes"].clone()
    valid = sample["det_labels"] > 0
    boxes[valid, 0] = width - sample["det_boxes"][valid, 2]
    boxes[valid, 2] = width - sample["det_boxes"][valid, 0]
    out["det_boxes"] = boxes
    out["image"] = torch.flip(sample["image"], dims=[-1])
    out["crops"] = torch.flip(sample["crops"], dims=[-1])
    return out


def collate_with_weights(batch: list[Sample], *, weights: tuple[float, float, float],
                         mining: tuple[float, ...] = (0.0, 2, 0.3, 0.25, 32, 224)) -> dict[str, Any]:
    """Default collate of the samples, plus ``loss_weights`` (detector, crop, image) and the ``mining`` parameters.

    ``mining`` = (enabled, proposals per image, positive IoU, crop margin, crop min side, crop size).
    """
    out = torch.utils.data.default_collate(batch)
    out["loss_weights"] = torch.tensor(weights, dtype=torch.float32)
    out["mining"] = torch.tensor(mining, dtype=torch.float32)
    return out


def letterbox_crops(images: torch.Tensor, boxes: list[torch.Tensor], *, margin: float, min_side: float,
                    size: int) -> torch.Tensor:
    """Crops of (N, 1, H, W) images in [0, 1] around boxes, as :func:`inference.radiograph.crop_with_margin` makes them.

    Each box grows by ``margin`` (at least ``min_side``), is clipped to the image, resampled with its aspect kept
    (RoIAlign) and centred on a black ``size`` square; the result is normalised with (MEAN, STD).
    """
    from torchvision.ops import roi_align

    h, w = images.shape[-2:]
    crops = []
    for n, bb in enumerate(boxes):
        for x0, y0, x1, y1 in bb.tolist():
            bw, bh = x1 - x0, y1 - y0
            gx, gy = max(bw * margin, (min_side - bw) / 2, 0.0), max(bh * margin, (min_side - bh) / 2, 0.0)
            cx0, cy0 = max(0.0, x0 - gx), max(0.0, y0 - gy)
            cx1, cy1 = min(float(w), x1 + gx), min(float(h), y1 + gy)
            cw, ch = max(cx1 - cx0, 1.0), max(cy1 - cy0, 1.0)
            s = size / max(cw, ch)
            ow, oh = max(1, round(cw * s)), max(1, round(ch * s))
            roi = torch.tensor([[0.0, cx0, cy0, cx0 + cw, cy0 + ch]], dtype=images.dtype, device=images.device)
            patch = roi_align(images[n:n + 1], roi, output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=2,
                              aligned=True)[0]
            canvas = images.new_zeros((1, size, size))
            py, px = (size - oh) // 2, (size - ow) // 2
            canvas[:, py:py + oh, px:px + ow] = patch
            crops.append(canvas)
    if not crops:
        return images.new_zeros((0, 1, size, size))
    return (torch.stack(crops) - MEAN) / STD


def mine_proposals(detector: torch.nn.Module, images: list[torch.Tensor], gt_boxes: torch.Tensor,
                   gt_labels: torch.Tensor, *, per_image: int, iou_thr: float) -> tuple[list[torch.Tensor],
                                                                                        torch.Tensor]:
    """The detector's top fracture proposals per image (eval mode, no gradient) and their IoU labels."""
    from torchvision.ops import box_iou

    was = detector.training
    detector.eval()
    try:
        with torch.no_grad():
            dets = detector(images)
    finally:
        detector.train(was)
    boxes, labels = [], []
    for d, gb, gl in zip(dets, gt_boxes, gt_labels, strict=True):
        frac = d["boxes"][d["labels"] == 1][:per_image].float()
        truth = gb[gl == 1].float()
        if len(frac) and len(truth):
            lab = (box_iou(frac, truth).max(dim=1).values >= iou_thr).float()
        else:
            lab = torch.zeros(len(frac), device=frac.device)
        boxes.append(frac)
        labels.append(lab)
    return boxes, torch.cat(labels) if labels else torch.zeros(0)


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
        """``physis_two_stage`` with the sub-networks of the method and variant, and the post-processing rules."""
        from inference.nets.physis_two_stage import physis_init_args

        return "physis_two_stage", physis_init_args(
            cfg.method, variant=cfg.variant, kind=cfg.detector_kind, det_long_side=cfg.det_long_side,
            image_size=cfg.image_size, crop_size=cfg.crop_size, post=cfg.post_config().to_dict())

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
        post = cfg.post_config()  # the task config rules (the model's copy predates a tuned threshold)
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
            mp = mean_average_precision(preds, gts, 0.5)
            metrics["detector_map50"] = mp["map"]
            metrics["detector_ap50_per_class"] = {LABEL_NAMES.get(k, str(k)): v for k, v in mp["ap_per_class"].items()}
            frac_gt = {k: np.asarray([b for b, lab in v if lab == 1], dtype=float).reshape(-1, 4) for k, v in gts.items()}
            fr = froc([p for p in preds if p.label == 1], frac_gt, len(y))
            metrics["detector_froc_mean_sensitivity"] = fr["mean_sensitivity"]
            metrics["detector_froc"] = {"fps_per_image": fr["fps_per_image"], "sensitivity": fr["sensitivity"]}
            for name in ("detector", "two_stage"):
                if name in table:
                    table[name]["map50"] = mp["map"]
                    table[name]["froc_mean_sensitivity"] = fr["mean_sensitivity"]
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
