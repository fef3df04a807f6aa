"""Box-patch pretraining views of ``physis_fracture`` (:mod:`training.patch_pretrain`).

The two-stage model has three networks, each with its own input, so each learns fracture patches of that input
(one *view* per network, trained in the same steps):

* ``image``: the whole-image classifier on its ``image_size`` letterbox, ``patch`` pixels per side;
* ``crop``: the crop classifier on the source image scaled by ``crop_size / patch_crop_extent`` (a typical
  fracture box with its margin fills a ``crop_size`` patch, as a crop does), ``crop_size`` pixels per side;
* ``detector``: the detector's trunk (``backbone.body``) under a temporary pooling + linear head, on its
  ``det_long_side`` letterbox in [0, 1] (normalised as the detector does), covering the same field as the
  ``image`` patch. The head is not part of the model and is dropped with the stage; the FPN, RPN and box head
  start fresh in ``train``.

Positives are images with a fracture box (centred on each box), negatives are images labelled negative; the
sampler cuts the negatives at the fracture positions, so a patch's place says nothing about its label. Images of
a fractured study that show no fracture box are left out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from inference.imgops import apply_affine
from inference.radiograph import detector_input
from training.data import Record
from training.patch_pretrain import PatchSource, PatchView
from training.tasks.physis_samples import image_boxes, image_label, source_images

__all__ = ["DetectorTrunkHead", "patch_sources", "patch_views", "views_of"]


def views_of(method: str) -> tuple[str, ...]:
    """The views whose networks a method builds."""
    return {"two_stage": ("crop", "detector", "image"), "classifier": ("image",), "detector": ("detector",)}[method]


def patch_sources(record: Record, *, views: tuple[str, ...], det_long_side: int, image_size: int, crop_size: int,
                  crop_extent: float) -> list[PatchSource]:
    """Each view's model input of every labelled image of a record, with the fracture box centres of positives."""
    out: list[PatchSource] = []
    for _, sop, image in source_images(record):
        label = image_label(record.row, sop)
        boxes = np.array([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for b, lab in image_boxes(record.row, sop)
                          if lab == 1], dtype=float).reshape(-1, 2)
        if label and not len(boxes):
            continue
        rows, cols = image.shape
        for view in views:
            if view == "detector":
                prep = detector_input(image, long_side=det_long_side)
                pixels = np.clip(prep.tensor[0].numpy() * prep.std + prep.mean, 0.0, 1.0)
            elif view == "image":
                prep = detector_input(image, long_side=image_size)
                pixels = prep.tensor[0].numpy()
            else:
                side = max(1, round(max(rows, cols) * crop_size / crop_extent))
                prep = detector_input(image, long_side=side, square=False)
                pixels = prep.tensor[0].numpy()
            centres = tuple((float(x), float(y)) for x, y in apply_affine(prep.source_to_model, boxes)) if label \
                else ()
            out.append(PatchSource(pixels.astype(np.float16), int(label), centres, record.key, view))
    return out


class DetectorTrunkHead(nn.Module):
    """The detector's trunk with a pooling + linear head: (N, 1, P, P) patches in [0, 1] -> one logit each.

    Patches are normalised with the detector's own ``transform.image_mean/std``; the trunk's last feature map is
    average-pooled. The trunk is shared with the detector (its weights are trained in place).
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.body = detector.backbone.body
        mean = torch.tensor(detector.transform.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(detector.transform.image_std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        channels = int(detector.backbone.fpn.inner_blocks[-1][0].in_channels)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1)."""
        feats = self.body((x - self.mean) / self.std)
        last = list(feats.values())[-1]
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(last, 1), 1))


def patch_views(model: nn.Module, *, det_long_side: int, image_size: int, crop_size: int) -> dict[str, PatchView]:
    """The networks of a :class:`~inference.nets.physis_two_stage.PhysisTwoStage` and their patch sides."""
    views: dict[str, PatchView] = {}
    if model.image_classifier is not None:
        views["image"] = PatchView(model.image_classifier)
    if model.crop_classifier is not None:
        views["crop"] = PatchView(model.crop_classifier, crop_size)
    if model.detector is not None:
        views["detector"] = PatchView(DetectorTrunkHead(model.detector), scale=det_long_side / image_size)
    return views
