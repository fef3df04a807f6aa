"""Training adapter of ``knee_bone_seg``: the 2D U-Net on knee MR slices, per-bone sigmoid channels.

Faithful defaults (``tasks/knee_bone_seg.md``, thesis section 3): N4 (shrink 4),
a square window at the femur/tibia junction resized to 224x224 with native
slices, population z-score, a depth-4 U-Net with 32 channels at every level
(ELU, dropout 0.5 at the bottleneck, 211,011 parameters), soft-Dice loss with
empty-on-empty = 1, Adam 1e-3 dropping to 1e-4 on a plateau, early stopping
with patience 10 (:data:`TRAIN_DEFAULTS`, applied by ``dicomnode-train train``
through ``adapter.train_config_defaults``).

Labels: the manifest row's ``mask`` is a label map (.mha/.nii; 1 femur,
2 tibia, 3 fibula) in the source geometry; :func:`load_label_map` aligns it
with the DICOM series (directly when the geometry matches, else by
nearest-neighbour resampling). Samples are single slices; evaluation
re-assembles each volume, post-processes it exactly as the node does and maps
it back to the source grid before scoring Dice and HD95 per bone there.

``python -m training.tasks.knee_bone_seg norm --data DIR`` fits the population
z-score on a training folder and prints the ``--set`` options that store it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import codes
from inference.bundle import CodedConcept, InputSpec, LabelSpec
from inference.mr import CropResize, ZScore
from inference.nets import build_network
from inference.nets.losses import SoftDiceLoss
from inference.series import Series, from_sitk, read_datasets
from inference.task_settings import KneeBoneSegSettings
from inference.tasks.knee_bone_seg import (
    BONE_CODES,
    BONES,
    choose_series,
    postprocess,
    prepare_knee,
)
from training.adapter import BaseAdapter, EvalResult, TaskConfig
from training.data import DataError, Record, Sample, process_pool
from training.metrics import dice, hd95
from training.tasks import register_adapter

log = logging.getLogger(__name__)

FIBULA = BONES.index("fibula")

__all__ = ["KneeAdapter", "KneeConfig", "TRAIN_DEFAULTS", "collate_knee", "fit_norm", "load_label_map",
           "prepare_record", "score_volume"]

#: the thesis's optimisation schedule (TrainConfig fields)
TRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam", "lr": 1e-3, "schedule": "plateau", "gamma": 0.1, "plateau_patience": 3, "min_lr": 1e-4,
    "early_stopping_patience": 10, "epochs": 100, "batch_size": 16,
    # fp32 training: the U-Net has no normalisation layers and its ELU activations left the fp16 range
    # (loss NaN in epoch 1 under CUDA autocast); the network is small enough that fp32 costs little
    "amp": False,
    # addition to the thesis: slices sampled balanced on "shows fibula" (sample label). With plain shuffling
    # most batches hold no fibula, the batch soft Dice scores an empty fibula channel 1 on them, and the
    # fibula stayed unlearned (validation Dice 0.03-0.07 over 5 epochs, models/README.md)
    "balanced_sampling": True,
}


KneeConfig = KneeBoneSegSettings  # the settings model serving validates bundles with (inference.task_settings)


# --------------------------------------------------------------------------- labels


def _mask_series(record: Record, cfg: KneeBoneSegSettings) -> Series:
    datasets = read_datasets(record.files)
    try:
        return choose_series(datasets, cfg)
    except Exception as exc:  # TaskError from selection: training data problem here
        raise DataError(f"record {record.key}: {exc}") from exc


def load_label_map(record: Record, series: Series) -> np.ndarray:
    """The record's label map (uint8, 0 background, 1 femur, 2 tibia, 3 fibula) on ``series``'s grid.

    Raises
    ------
    DataError
        If the row has no mask, the file is unreadable, or it cannot be put on the series grid.
    """
    import SimpleITK as sitk

    rel = record.row.get("mask")
    if not rel:
        raise DataError(f"record {record.key}: manifest row has no 'mask'")
    path = record.resolve(rel)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"record {record.key}: cannot read mask {path}: {exc}") from exc
    arr, affine = from_sitk(img)
    shape = (len(series), *series.volume().shape[1:])
    if arr.shape == shape and np.allclose(affine, series.affine, atol=1e-3):
        out = arr
    elif series.has_geometry and not np.allclose(affine, np.eye(4)):
        ref = series.to_sitk(np.zeros(shape, dtype=np.uint8))
        out = sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        log.debug("record %s: mask resampled onto the series grid", record.key)
    elif arr.shape == shape:
        log.warning("record %s: mask has no geometry; assuming the series' slice order", record.key)
        out = arr
    else:
        raise DataError(f"record {record.key}: mask shape {arr.shape} does not fit the series {shape}")
    out = np.asarray(out)
    if out.min() < 0 or out.max() > len(BONES):
        raise DataError(f"record {record.key}: mask labels must lie in 0..{len(BONES)}")
    return out.astype(np.uint8)


# --------------------------------------------------------------------------- samples


def prepare_record(record: Record, cfg: KneeConfig) -> list[Sample]:
    """One sample per slice: un-normalised image, model-grid targets, and what scoring in source space needs.

    ``label`` is 1 when the slice shows fibula in the model grid: with ``balanced_sampling`` (a
    training default) half of every epoch's slices show the fibula, which covers ~15 % of the
    slices and ~0.4 % of the pixels of a synthetic knee.
    """
    series = _mask_series(record, cfg)
    volume = series.volume()
    labels = load_label_map(record, series)
    prepared = prepare_knee(volume, series.spacing, cfg, norm=None)
    crop = prepared.crop
    targets = np.stack([crop.mask_to_model(labels == i + 1) for i in range(len(BONES))], axis=1)  # (n, 3, H, W)
    geom = np.asarray([crop.r0, crop.c0, crop.size_r, crop.size_c, *crop.source_shape], dtype=np.int64)
    spacing = np.asarray(series.spacing, dtype=np.float32)
    n = len(series)
    return [{
        "image": prepared.array[k][None].astype(np.float32),
        "target": targets[k].astype(np.uint8),
        "slice": k, "n_slices": n, "crop": geom, "spacing": spacing,
        "source_label": labels[k],
        "label": int(targets[k, FIBULA].any()),  # for slice sampling balanced on the fibula
    } for k in range(n)]


def collate_knee(samples: list[Sample], *, mean: float, std: float, dice_over_batch: bool = True) -> dict[str, Any]:
    """Stack fixed-size fields, keep per-record ones (``source_label``) as lists; z-score the images."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        tensors = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for v in values]
        if all(t.shape == tensors[0].shape for t in tensors):
            out[key] = torch.stack(tensors)
        else:
            out[key] = tensors
    out["image"] = (out["image"].float() - mean) / std
    out["dice_over_batch"] = torch.tensor([dice_over_batch])
    return out


def augment_sample(sample: Sample) -> Sample:
    """Random left-right flip and a global intensity factor in [0.9, 1.1] (training only)."""
    if torch.rand(()) < 0.5:
        sample["image"] = torch.flip(sample["image"], dims=(-1,))
        sample["target"] = torch.flip(sample["target"], dims=(-1,))
    sample["image"] = sample["image"] * (0.9 + 0.2 * torch.rand(()))
    return sample


# --------------------------------------------------------------------------- scoring


def _bbox_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    both = pred | truth
    if not both.any():
        return 0.0
    idx = np.nonzero(both)
    sl = tuple(slice(max(0, int(i.min()) - 2), int(i.max()) + 3) for i in idx)
    return hd95(pred[sl], truth[sl], spacing)


def score_volume(pred: np.ndarray, labels: np.ndarray, spacing: Sequence[float], *, with_hd95: bool = True
                 ) -> dict[str, float]:
    """Dice (and HD95 in mm) per bone plus the merged-mask Dice/IoU of one source-grid volume.

    ``pred`` is (bones, slices, rows, cols) boolean; ``labels`` the (slices, rows, cols) label map.
    """
    out: dict[str, float] = {}
    for b, bone in enumerate(BONES):
        t = labels == b + 1
        out[f"dice_{bone}"] = dice(pred[b], t)
        if with_hd95:
            out[f"hd95_{bone}"] = _bbox_hd95(pred[b], t, spacing)
    pm, tm = pred.any(axis=0), labels > 0
    inter, union = float(np.logical_and(pm, tm).sum()), float(np.logical_or(pm, tm).sum())
    out["dice_merged"] = dice(pm, tm)
    out["iou_merged"] = inter / union if union else 1.0
    return out


def _mean_finite(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# --------------------------------------------------------------------------- the adapter

_DICE = SoftDiceLoss(from_logits=True, smooth=1.0)


class KneeAdapter(BaseAdapter):
    """femur/tibia/fibula 2D U-Net."""

    name = "knee_bone_seg"
    config_model = KneeConfig
    primary_metric = "dice_mean"
    greater_is_better = True
    train_config_defaults = TRAIN_DEFAULTS

    def architecture(self, cfg: TaskConfig) -> tuple[str, dict[str, Any]]:
        """``unet2d``; faithful init args are the defaults (``{}``)."""
        assert isinstance(cfg, KneeConfig)
        args: dict[str, Any] = {}
        if cfg.base_channels != 32:
            args["base_channels"] = cfg.base_channels
        if cfg.depth != 4:
            args["depth"] = cfg.depth
        if cfg.dropout != 0.5:
            args["dropout"] = cfg.dropout
        return "unet2d", args

    def build_model(self, cfg: TaskConfig) -> torch.nn.Module:
        """A fresh U-Net (1 input channel, 3 sigmoid outputs)."""
        arch, args = self.architecture(cfg)
        return build_network(arch, **args)

    def preprocessor(self, cfg: TaskConfig) -> Callable[[Record], list[Sample]]:
        """Picklable ``record -> per-slice samples``."""
        return functools.partial(prepare_record, cfg=cfg)

    def preprocess_signature(self, cfg: TaskConfig) -> str:
        """Only the fields that change the cached samples (not the z-score, applied in collate)."""
        assert isinstance(cfg, KneeConfig)
        keys = ("crop_mm", "size", "n4", "n4_shrink", "min_slices")
        return f"{type(self).__module__}.v2:" + ",".join(f"{k}={getattr(cfg, k)}" for k in keys)

    def train_transform(self, cfg: TaskConfig) -> Callable[[Sample], Sample] | None:
        """Flip + intensity factor when ``augment``."""
        assert isinstance(cfg, KneeConfig)
        return augment_sample if cfg.augment else None

    def collate(self, cfg: TaskConfig) -> Callable[[list[Sample]], Any]:
        """:func:`collate_knee` with the population z-score."""
        assert isinstance(cfg, KneeConfig)
        return functools.partial(collate_knee, mean=cfg.norm_mean, std=cfg.norm_std,
                                 dice_over_batch=cfg.dice_over == "batch")

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """Soft Dice (F1) loss over the three sigmoid channels (empty-on-empty scores 1).

        With ``dice_over="batch"`` (set by :meth:`collate`) each bone's Dice is taken over every
        pixel of the batch, as the flattened Keras F1 loss does; per slice, the many slices
        without a fibula reward an empty prediction and training collapses to it first.
        """
        pred, target = outputs.float(), batch["target"].float()
        if bool(batch.get("dice_over_batch", torch.ones(1))[0]):
            pred, target = pred.transpose(0, 1).unsqueeze(0), target.transpose(0, 1).unsqueeze(0)
        return _DICE(pred, target)

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        """``model(image)`` (the images are already z-scored by the collate)."""
        return model(batch["image"].to(device, non_blocking=True))

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: TaskConfig) -> EvalResult:
        """Per volume: post-process as the node does, map back to the source grid, Dice/HD95 per bone.

        Like the thesis's masks ("a window around the knee cap where the three bones meet"),
        the ground truth is scored inside the analysis window; ``*_full_image`` metrics also
        count bone outside it (which the window never shows) as missed.
        """
        assert isinstance(cfg, KneeConfig)
        pending: dict[int, dict[str, Any]] = {}
        rows: list[dict[str, float]] = []
        for batch in loader:
            probs = torch.sigmoid(model(batch["image"].to(device)).float()).cpu().numpy()
            for i in range(probs.shape[0]):
                ri = int(batch["record_index"][i])
                n = int(batch["n_slices"][i])
                entry = pending.setdefault(ri, {"probs": {}, "labels": {}, "crop": batch["crop"][i].numpy(),
                                                "spacing": batch["spacing"][i].numpy(), "n": n})
                k = int(batch["slice"][i])
                entry["probs"][k] = probs[i].astype(np.float16)
                entry["labels"][k] = batch["source_label"][i].numpy()
                if len(entry["probs"]) == n:
                    rows.append(self._score(pending.pop(ri), cfg, cfg.hd95))
        for entry in pending.values():  # incomplete volumes (should not happen): score what is there
            rows.append(self._score(entry, cfg, cfg.hd95))
        metrics: dict[str, Any] = {"n_volumes": len(rows)}
        if rows:
            for key in rows[0]:
                metrics[key] = _mean_finite([r[key] for r in rows])
            for bone in BONES:
                if f"hd95_{bone}" in rows[0]:
                    metrics[f"hd95_{bone}_missed"] = int(sum(not np.isfinite(r[f"hd95_{bone}"]) for r in rows))
        metrics["dice_mean"] = float(np.mean([metrics.get(f"dice_{b}", float("nan")) for b in BONES]))
        table = {bone: {"dice": metrics.get(f"dice_{bone}", float("nan")),
                        "hd95_mm": metrics.get(f"hd95_{bone}", float("nan"))} for bone in BONES}
        return EvalResult(metrics=metrics, class_names=list(BONES), tables={"per_bone (source grid)": table})

    @staticmethod
    def _score(entry: dict[str, Any], params: KneeBoneSegSettings, with_hd95: bool) -> dict[str, float]:
        ks = sorted(entry["probs"])
        probs = np.stack([entry["probs"][k] for k in ks]).astype(np.float32)  # (n, 3, H, W)
        labels = np.stack([entry["labels"][k] for k in ks])
        g = [int(v) for v in entry["crop"]]
        crop = CropResize(g[0], g[1], g[2], g[3], (g[4], g[5]), params.size)
        pred = crop.mask_to_source(postprocess(probs, params))
        spacing = [float(s) for s in entry["spacing"]]
        win = (slice(None), slice(crop.r0, crop.r0 + crop.size_r), slice(crop.c0, crop.c0 + crop.size_c))
        pred_w, lab_w = pred[(slice(None), *win)], labels[win]  # the prediction is empty outside the window
        scores = score_volume(pred_w, lab_w, spacing, with_hd95=with_hd95)
        totals = np.bincount(labels.ravel(), minlength=len(BONES) + 1)
        for b, bone in enumerate(BONES):
            inter = float(np.logical_and(pred_w[b], lab_w == b + 1).sum())
            denom = float(pred_w[b].sum()) + float(totals[b + 1])
            scores[f"dice_{bone}_full_image"] = 2.0 * inter / denom if denom else 1.0
        pm = pred_w.any(axis=0)
        inter = float(np.logical_and(pm, lab_w > 0).sum())
        denom = float(pm.sum()) + float(totals[1:].sum())
        scores["dice_merged_full_image"] = 2.0 * inter / denom if denom else 1.0
        return scores

    def input_spec(self, cfg: TaskConfig) -> InputSpec:
        """MR, 224x224 in-plane, native slices, population z-score (a description: serving reads ``task_config``)."""
        assert isinstance(cfg, KneeConfig)
        return InputSpec(modality=["MR"], size=[cfg.size, cfg.size], channels=1, normalisation="zscore",
                         mean=cfg.norm_mean, std=cfg.norm_std,
                         extra={"pipeline": "inference.tasks.knee_bone_seg.prepare_knee with the task_config "
                                            "settings (KneeBoneSegSettings)"})

    def labels(self, cfg: TaskConfig) -> list[LabelSpec]:
        """One sigmoid channel per bone, SNOMED coded, category Anatomical Structure."""
        cat = CodedConcept(value=codes.ANATOMICAL_STRUCTURE.value, scheme=codes.ANATOMICAL_STRUCTURE.scheme,
                           meaning=codes.ANATOMICAL_STRUCTURE.meaning)
        return [LabelSpec(name=bone, index=i, category=cat,
                          code=CodedConcept(value=BONE_CODES[bone].value, scheme=BONE_CODES[bone].scheme,
                                            meaning=BONE_CODES[bone].meaning))
                for i, bone in enumerate(BONES)]

    def reference_figures(self) -> dict[str, Any]:
        """The published figures (merged bone mask, private data)."""
        return {
            "dice_merged": 0.98, "iou_merged": 0.96,
            "_notes": ("Published paper of the knee thesis: Dice 98% and IoU 96% on a merged bone mask "
                       "(76 private coronal volumes); no per-bone Dice or HD95 were published. Ours are per "
                       "volume on the source grid after the exact inverse of crop and resize, averaged over "
                       "volumes; the fibula is reported separately. Synthetic data, not comparable to patients."),
        }

    def card_notes(self, cfg: TaskConfig) -> str:
        """Design choices and limits."""
        assert isinstance(cfg, KneeConfig)
        arch, args = self.architecture(cfg)
        return (
            "## Task notes\n\n"
            f"- Network `{arch}` {args or '(faithful: depth 4, 32 channels, ELU, dropout 0.5, 211,011 parameters)'}"
            ", one sigmoid channel per bone (femur, tibia, fibula); soft-Dice loss.\n"
            f"- Pre-processing (thesis order): {cfg.crop_mm:g} mm square at the femur/tibia junction (intensity "
            f"profile), {cfg.size}x{cfg.size} in-plane with native slices, N4 on that stack (shrink {cfg.n4_shrink}), "
            f"intensity / median of the Otsu foreground, z-score mean {cfg.norm_mean:.4g} std {cfg.norm_std:.4g}.\n"
            "- Metrics: Dice/HD95 per bone on the source grid against the ground truth inside the analysis window "
            "(the thesis's masks covered only that window); `*_full_image` also counts bone outside it.\n"
            "- Post-processing: threshold, largest 3-D component, 2-D hole filling; masks are mapped back to the "
            "source pixel grid exactly (nearest cell).\n"
            "- Expects coronal or sagittal knee MR with at least "
            f"{cfg.min_slices} slices and rows running head to feet; bone outside the crop window is not found.\n"
        )


def _prepared_crops(args: tuple[Record, KneeConfig]) -> np.ndarray:
    record, cfg = args
    series = _mask_series(record, cfg)
    return prepare_knee(series.volume(), series.spacing, cfg, norm=None).array


def fit_norm(records: Sequence[Record], cfg: KneeConfig, max_records: int = 16, workers: int = 0) -> ZScore:
    """Population z-score over the pre-processed (un-normalised) crops of up to ``max_records`` records."""
    chosen = list(records)[:max_records]
    if not chosen:
        raise DataError("no records to fit the z-score on")
    jobs = [(r, cfg) for r in chosen]
    if workers > 0 and len(jobs) > 1:
        with process_pool(workers) as pool:
            arrays = list(pool.map(_prepared_crops, jobs))
    else:
        arrays = [_prepared_crops(j) for j in jobs]
    return ZScore.fit(arrays)


register_adapter(KneeAdapter())


def main(argv: list[str] | None = None) -> int:
    """``python -m training.tasks.knee_bone_seg norm --data DIR``: print the fitted z-score as --set options."""
    p = argparse.ArgumentParser(prog="python -m training.tasks.knee_bone_seg")
    sub = p.add_subparsers(dest="cmd", required=True)
    n = sub.add_parser("norm", help="fit the population z-score on the training split of a data folder")
    n.add_argument("--data", required=True, type=Path)
    n.add_argument("--max-records", type=int, default=16)
    n.add_argument("--workers", type=int, default=0, help="pre-processing processes")
    args = p.parse_args(argv)
    from training.data import load_records, split_records

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    split = split_records(load_records(args.data))
    z = fit_norm(split.train or split.val, KneeConfig(), args.max_records, args.workers)
    print(f"--set task.norm_mean={z.mean:.6g} --set task.norm_std={z.std:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
