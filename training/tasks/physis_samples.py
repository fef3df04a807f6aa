"""Training samples of ``physis_fracture``: manifest labels, per-image inputs and batch-time crops.

* :func:`image_boxes` / :func:`image_label` read a record's manifest row (boxes with labels
  fracture / metal / text, image or study labels);
* :func:`prepare_record` turns a record's source images into cached samples: the letterboxed
  detector and whole-image inputs with their boxes, and crop-classifier crops (jittered fracture
  boxes as positives, metal/text and random boxes on the anatomy as negatives), cut from the
  full-resolution source as serving cuts them (:func:`inference.radiograph.crop_with_margin`);
* :func:`flip_sample` and :func:`collate_with_weights` are the training transform and collate;
* :func:`letterbox_crops` and :func:`mine_proposals` make crop-classifier inputs from the
  detector's own proposals during training (hard negatives).

The adapter that uses them is :mod:`training.tasks.physis_fracture`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
import torch

from inference.radiograph import MEAN, STD, crop_with_margin, detector_input, to_float
from inference.tasks.physis_fracture_post import LABEL_NAMES
from training.data import Record, Sample

__all__ = ["MAX_BOXES", "collate_with_weights", "flip_sample", "image_boxes", "image_label", "letterbox_crops",
           "mine_proposals", "prepare_record", "source_images"]

MAX_BOXES = 16
_LABEL_IDS = {name: idx for idx, name in LABEL_NAMES.items()}
_POSITIVE_WORDS = {"1", "true", "yes", "fracture", "fractured", "positive", "present"}


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
