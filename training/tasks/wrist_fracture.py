"""Training adapter of ``wrist_fracture``: ResNet18 on 341x512 wrist radiograph parts, study score by ALO.

Faithful defaults (thesis / spec): the pre-processing of
:mod:`inference.radiograph` (the same code as serving), one sample per
anatomic part, ResNet18 with one grey input channel and one logit, Adam with
batch 32 and class-balanced sampling without replacement (set in
``train_config_defaults``; the trainer implements it), augmentation by a random
crop of 90-100 % of the area and a horizontal flip (no colour inversion).

Labels: the manifest labels the *study*; by default every image of a study
gets the study label (``image_labels="study"``, as in the thesis, which had
study labels only). ``image_labels="boxes"`` instead marks an image positive
only when the manifest gives a fracture box on it.

Evaluation aggregates parts -> images (max) -> studies by "at least one"
(ALO: max over images, positive at ``threshold``) and by majority vote (more
than half of the images at or above ``threshold``). The threshold is a fixed
0.5 by default: the sampler trains on balanced classes, so 0.5 is the
operating point the logit is calibrated for; AUC is reported as the
threshold-free figure. The primary metric (checkpoint selection) is the
validation study accuracy by ALO, as in the thesis.
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
from inference.findings import FRACTURE
from inference.imgops import apply_affine
from inference.nets import build_network
from inference.radiograph import (
    Part,
    PreparedImage,
    prepare,
    split_parts,
    to_float,
)
from inference.task_settings import WristFractureSettings
from training.adapter import BaseAdapter, EvalResult, move_to
from training.data import Record, Sample
from training.metrics import (
    accuracy,
    aggregate_by_group,
    bootstrap_ci,
    confusion_matrix,
    roc_auc,
    sensitivity_specificity,
)
from training.patch_pretrain import PatchSource
from training.tasks import register_adapter

log = logging.getLogger(__name__)

__all__ = ["WristFractureAdapter", "WristFractureConfig", "augment_tensor", "image_label", "patch_sources",
           "prepare_record", "study_metrics"]

#: thesis figures (private Asepeyo data, validation split; the thesis had no test set)
REFERENCE = {
    "study_accuracy_alo": 0.850,
    "image_accuracy": 0.7835,
    "study_sensitivity_alo": 0.860,
    "study_specificity_alo": 0.840,
    "_notes": ("Thesis (Asepeyo, 13,538 studies, 31.13% with fracture): validation study accuracy 85.0% with the "
               "'at least one' rule, image accuracy 78.35%, validation sensitivity 86.0% and specificity 84.0%. "
               "The thesis had no test set and reports no AUC; ours are on the locked hold-out split."),
}


WristFractureConfig = WristFractureSettings  # the settings model serving validates bundles with (inference.task_settings)


def image_label(row: dict[str, Any], sop_uid: str, mode: str) -> int:
    """Label of one image from its study's manifest row (study label, or a fracture box on this image)."""
    study = int(bool(int(row.get("label", 0) or 0)))
    if mode == "study":
        return study
    boxes = row.get("boxes") or []
    return int(study == 1 and any(str(b.get("sop_instance_uid")) == sop_uid for b in boxes))


def _prepared_parts(record: Record, *, input_hw: tuple[int, int], mean: float, std: float, split: bool,
                    min_share: float, align: bool, image_labels: str
                    ) -> Iterator[tuple[PreparedImage, int, int, list[dict[str, Any]]]]:
    """(prepared part, image label, image index, the manifest's boxes on that image) for every part of a study."""
    for index, path in enumerate(sorted(record.files)):
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        image = to_float(ds)
        rows, cols = image.shape
        parts = split_parts(image, min_share=min_share) if split else [Part((0, 0, cols, rows), 1.0)]
        sop = str(ds.SOPInstanceUID)
        label = image_label(record.row, sop, image_labels)
        boxes = [b for b in record.row.get("boxes") or [] if str(b.get("sop_instance_uid")) == sop]
        for part in parts:
            prep = prepare(image, bbox=part.bbox, align=align, out_hw=tuple(input_hw), mean=mean, std=std)
            yield prep, label, index, boxes


def prepare_record(record: Record, *, input_hw: tuple[int, int], mean: float, std: float, split: bool,
                   min_share: float, align: bool, image_labels: str) -> list[Sample]:
    """One sample per anatomic part of every image of a study record (float16 image, label, image index)."""
    return [{"image": prep.tensor.numpy().astype(np.float16), "label": np.int64(label), "image_index": np.int64(index)}
            for prep, label, index, _ in _prepared_parts(record, input_hw=input_hw, mean=mean, std=std, split=split,
                                                         min_share=min_share, align=align,
                                                         image_labels=image_labels)]


def patch_sources(record: Record, *, input_hw: tuple[int, int], mean: float, std: float, split: bool,
                  min_share: float, align: bool) -> list[PatchSource]:
    """Model inputs of a study for box-patch pretraining (:mod:`training.patch_pretrain`).

    A part of a fracture-labelled study with a fracture box on its image is a positive source centred on the box
    (mapped through the exact pre-processing transform; a box outside the part leaves the part out). Parts of a
    study labelled negative are negative sources. Other parts (a positive study's image without a box) are left
    out: the manifest does not say where, or whether, they show the fracture.
    """
    study_positive = bool(int(record.row.get("label", 0) or 0))
    out: list[PatchSource] = []
    for prep, label, _, boxes in _prepared_parts(record, input_hw=input_hw, mean=mean, std=std, split=split,
                                                 min_share=min_share, align=align, image_labels="boxes"):
        image = prep.tensor[0].numpy().astype(np.float16)
        if not study_positive:
            out.append(PatchSource(image, 0, (), record.key))
            continue
        if not label:
            continue
        h, w = image.shape
        centres = apply_affine(prep.source_to_model, np.array(
            [[(float(b["x0"]) + float(b["x1"])) / 2, (float(b["y0"]) + float(b["y1"])) / 2] for b in boxes]))
        inside = tuple((float(x), float(y)) for x, y in centres if 0 <= x < w and 0 <= y < h)
        if inside:
            out.append(PatchSource(image, 1, inside, record.key))
    return out


def augment_tensor(sample: Sample, *, crop_area: tuple[float, float] = (0.9, 1.0), hflip_p: float = 0.5) -> Sample:
    """Random crop of ``crop_area`` of the image area (aspect kept), resized back, then a horizontal flip.

    Operates on the normalised tensor; the padding value is the normalised
    black (no colour inversion). Uses torch's RNG (seeded per worker).
    """
    img = sample["image"].float()
    _, h, w = img.shape
    side = float(np.sqrt(crop_area[0] + (crop_area[1] - crop_area[0]) * float(torch.rand(()))))
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    y0 = int(torch.randint(0, h - ch + 1, ()))
    x0 = int(torch.randint(0, w - cw + 1, ()))
    crop = img[:, y0:y0 + ch, x0:x0 + cw]
    if (ch, cw) != (h, w):
        crop = F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    if float(torch.rand(())) < hflip_p:
        crop = torch.flip(crop, dims=[-1])
    out = dict(sample)
    out["image"] = crop.contiguous()
    return out


def collate_float(batch: list[Sample]) -> dict[str, torch.Tensor]:
    """torch's default collate, with images as float32 (they are cached as float16)."""
    out = torch.utils.data.default_collate(batch)
    out["image"] = out["image"].float()
    return out


def study_metrics(prob: np.ndarray, label: np.ndarray, record: np.ndarray, image: np.ndarray, *,
                  threshold: float = 0.5, n_boot: int = 1000) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Image- and study-level metrics from per-part probabilities.

    Parts -> image by max, images -> study by ALO (max) and by majority vote.

    Returns
    -------
    (metrics, study labels, study ALO probabilities)
    """
    prob, label = np.asarray(prob, float), np.asarray(label).astype(int)
    record, image = np.asarray(record).astype(np.int64), np.asarray(image).astype(np.int64)
    img_key = record * 100000 + image
    img_ids, img_prob = aggregate_by_group(prob, img_key, "max")
    _, img_label = aggregate_by_group(label, img_key, "max")
    img_label = img_label.astype(int)
    img_record = img_ids // 100000
    st_ids, st_alo = aggregate_by_group(img_prob, img_record, "max")
    _, st_major = aggregate_by_group(img_prob, img_record, "majority", threshold)
    # study truth: the manifest's study label is every image's label in "study" mode; in "boxes" mode a study
    # is positive when any image is
    _, st_label = aggregate_by_group(label, record, "max")
    st_label = st_label.astype(int)
    img_pred = (img_prob >= threshold).astype(int)
    alo_pred = (st_alo >= threshold).astype(int)
    maj_pred = (st_major > 0.5).astype(int)
    sens, spec = sensitivity_specificity(st_label, alo_pred)
    sens_m, spec_m = sensitivity_specificity(st_label, maj_pred)
    sens_i, spec_i = sensitivity_specificity(img_label, img_pred)
    auc, lo, hi = bootstrap_ci(roc_auc, st_label, st_alo, n_boot=n_boot) if n_boot else (
        roc_auc(st_label, st_alo), float("nan"), float("nan"))
    iauc, ilo, ihi = bootstrap_ci(roc_auc, img_label, img_prob, n_boot=n_boot) if n_boot else (
        roc_auc(img_label, img_prob), float("nan"), float("nan"))
    metrics: dict[str, Any] = {
        "n_studies": int(len(st_ids)), "n_images": int(len(img_ids)), "n_parts": int(len(prob)),
        "study_prevalence": float(st_label.mean()) if len(st_label) else float("nan"),
        "study_accuracy_alo": accuracy(st_label, alo_pred),
        "study_sensitivity_alo": sens, "study_specificity_alo": spec,
        "study_auc": auc, "study_auc_ci95": [lo, hi],
        "study_accuracy_majority": accuracy(st_label, maj_pred),
        "study_sensitivity_majority": sens_m, "study_specificity_majority": spec_m,
        "image_accuracy": accuracy(img_label, img_pred),
        "image_sensitivity": sens_i, "image_specificity": spec_i,
        "image_auc": iauc, "image_auc_ci95": [ilo, ihi],
        "threshold": float(threshold),
        "confusion_matrix": confusion_matrix(st_label, alo_pred, 2).tolist(),
        "confusion_matrix_majority": confusion_matrix(st_label, maj_pred, 2).tolist(),
        "confusion_matrix_image": confusion_matrix(img_label, img_pred, 2).tolist(),
    }
    return metrics, st_label, st_alo


class WristFractureAdapter(BaseAdapter):
    """ResNet18 fracture classifier for adult wrist radiographs."""

    name = "wrist_fracture"
    config_model = WristFractureConfig
    primary_metric = "study_accuracy_alo"
    greater_is_better = True

    #: TrainConfig values the thesis fixes (the train CLI's defaults for this task; see train_config_defaults)
    train_config_defaults: dict[str, Any] = {"batch_size": 32, "optimizer": "adam", "lr": 1e-3,
                                             "balanced_sampling": True}

    def architecture(self, cfg: WristFractureConfig) -> tuple[str, dict[str, Any]]:  # type: ignore[override]
        """``resnet_classifier`` with the configured backbone, one logit."""
        args: dict[str, Any] = {"backbone": cfg.backbone, "in_channels": cfg.in_channels, "num_outputs": 1}
        if cfg.stages != 4:
            args["stages"] = cfg.stages
        if cfg.pretrained_path:
            args["pretrained_path"] = cfg.pretrained_path
        return "resnet_classifier", args

    def build_model(self, cfg: WristFractureConfig) -> torch.nn.Module:  # type: ignore[override]
        """A freshly initialised network (pretrained trunk only from a local file)."""
        arch, args = self.architecture(cfg)
        return build_network(arch, **args)

    def preprocessor(self, cfg: WristFractureConfig) -> Any:  # type: ignore[override]
        """Picklable ``record -> samples`` (one per anatomic part)."""
        return functools.partial(prepare_record, input_hw=tuple(cfg.input_hw), mean=cfg.mean, std=cfg.std,
                                 split=cfg.split_parts, min_share=cfg.min_part_share, align=cfg.align,
                                 image_labels=cfg.image_labels)

    def patch_preprocessor(self, cfg: WristFractureConfig) -> Any:
        """Picklable ``record -> patch sources`` for box-patch pretraining (:mod:`training.patch_pretrain`)."""
        return functools.partial(patch_sources, input_hw=tuple(cfg.input_hw), mean=cfg.mean, std=cfg.std,
                                 split=cfg.split_parts, min_share=cfg.min_part_share, align=cfg.align)

    def preprocess_signature(self, cfg: WristFractureConfig) -> str:  # type: ignore[override]
        """Changes with every field that alters the cached samples."""
        keys = ("input_hw", "mean", "std", "split_parts", "min_part_share", "align", "image_labels")
        return "wrist_fracture/v1:" + repr({k: getattr(cfg, k) for k in keys})

    def train_transform(self, cfg: WristFractureConfig) -> Any:  # type: ignore[override]
        """Random crop 90-100 % + horizontal flip p=0.5 (no inversion)."""
        return functools.partial(augment_tensor, crop_area=tuple(cfg.crop_area), hflip_p=cfg.hflip_p)

    def collate(self, cfg: WristFractureConfig) -> Any:  # type: ignore[override]
        """Default collate with float32 images."""
        return collate_float

    def loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Binary cross-entropy on the single logit."""
        return F.binary_cross_entropy_with_logits(outputs[:, 0].float(), batch["label"].float())

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: WristFractureConfig) -> EvalResult:  # type: ignore[override]
        """Image and study metrics (ALO and majority) with bootstrap AUC intervals."""
        probs, labels, records, images = [], [], [], []
        for batch in loader:
            b = move_to(batch, device)
            logits = model(b["image"].float())
            probs.append(torch.sigmoid(logits[:, 0].float()).cpu().numpy())
            labels.append(batch["label"].numpy())
            records.append(batch["record_index"].numpy())
            images.append(batch["image_index"].numpy())
        metrics, y, p = study_metrics(np.concatenate(probs), np.concatenate(labels), np.concatenate(records),
                                      np.concatenate(images), threshold=cfg.threshold, n_boot=cfg.n_boot)
        return EvalResult(metrics=metrics, y_true=y, y_prob=p, class_names=["no fracture", "fracture"],
                          tables={"study confusion matrix (ALO; rows truth, cols prediction)":
                                  {"truth no fracture": {"pred no fracture": metrics["confusion_matrix"][0][0],
                                                         "pred fracture": metrics["confusion_matrix"][0][1]},
                                   "truth fracture": {"pred no fracture": metrics["confusion_matrix"][1][0],
                                                      "pred fracture": metrics["confusion_matrix"][1][1]}}})

    def input_spec(self, cfg: WristFractureConfig) -> InputSpec:  # type: ignore[override]
        """DX/CR, 512x341 (rows x cols), z-score with the thesis's constants."""
        return InputSpec(modality=["DX", "CR"], size=list(cfg.input_hw), channels=1, normalisation="zscore",
                         mean=cfg.mean, std=cfg.std,
                         extra={"split_parts": cfg.split_parts, "min_part_share": cfg.min_part_share,
                                "align": cfg.align, "study_aggregation": "at_least_one",
                                "threshold": cfg.threshold})

    def labels(self, cfg: WristFractureConfig) -> list[LabelSpec]:  # type: ignore[override]
        """One output: fracture."""
        return [LabelSpec(name="fracture", index=0,
                          code=CodedConcept(value=FRACTURE.value, scheme=FRACTURE.scheme, meaning=FRACTURE.meaning))]

    def reference_figures(self) -> dict[str, Any]:
        """The thesis's validation figures."""
        return dict(REFERENCE)

    def card_notes(self, cfg: WristFractureConfig) -> str:
        """Design choices and limits of the wrist model."""
        arch, args = self.architecture(cfg)
        return (
            "## Wrist fracture model\n\n"
            f"- Network: `{arch}` {args}; input {cfg.input_hw[1]}x{cfg.input_hw[0]} (W x H) letterboxed to 2:3, "
            f"normalised with mean {cfg.mean} / std {cfg.std}.\n"
            "- Pre-processing: DICOM pixel pipeline, MONOCHROME1 inverted from the header (corner-mean fallback only "
            "for unreliable headers, idempotent), one sample per anatomic part, rotation to fingers-up.\n"
            f"- Study score: 'at least one' (max over images), positive at probability >= {cfg.threshold} "
            "(fixed; the class-balanced sampler makes 0.5 the calibrated operating point). Majority vote reported.\n"
            f"- Image labels: {cfg.image_labels} labels.\n"
            "- Adults only (route min_age_years 18); not for paediatric wrists (see physis_fracture).\n"
        )


register_adapter(WristFractureAdapter())
