"""DSNet: Faster R-CNN with a ResNet50 + DS-attention backbone, and its baselines.

Xue et al. 2022 (``tasks/spine_bmd.md``) put DS modules "after stage 1
(before stage 2's residual layer)" and "at the end of stage 5". In
torchvision's names (see :func:`inference.nets.detection.resnet_fpn_backbone`):

* stage 1 = the stem ``conv1, bn1, relu, maxpool`` (7x7 conv + 3x3 max pool,
  as the paper's Figure 3 describes it), 64 channels at stride 4;
* stages 2-5 = ``layer1`` .. ``layer4``.

So the first module (``attn_stem``) sits after ``maxpool`` and before
``layer1`` (C = 64) and the second (``attn_last``) after ``layer4`` (C = 2048
for ResNet50). The FPN reads layer1..layer3 and the output of the second
module, so every detection level sees the attended stage-5 features through
the top-down path. SE and SK baselines are inserted at exactly the same two
places, so the variants differ only in the attention module.

Classes: 0 background, 1 normal, 2 osteopenia, 3 osteoporosis (``SPINE_CLASSES``);
each box is a vertebral body. The paper's "dice loss" cannot apply to Faster
R-CNN's box outputs; training uses torchvision's standard RPN and Fast R-CNN
losses (returned as a dict in train mode).

Run ``python -m inference.nets.spine_detector --param-table`` for the
parameter table of the four backbones.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from torch import nn
from torchvision.models.detection import FasterRCNN

from inference.nets.attention import build_attention
from inference.nets.detection import faster_rcnn, resnet_fpn_backbone

__all__ = ["SPINE_BACKBONES", "SPINE_CLASSES", "SPINE_LIGHT_ARGS", "build_spine_detector", "param_table"]

SPINE_CLASSES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
SPINE_BACKBONES: dict[str, str] = {
    "resnet50": "none",
    "resnet50_se": "se",
    "resnet50_sk": "sk",
    "resnet50_ds": "ds",
}

# Demo-bundle variant: the same design (attention after the stem and after the
# last kept stage, Faster R-CNN + FPN) on a ResNet18 trunk without layer4, with
# a 128-channel FPN and a 256-wide box head: ~5.2 M parameters (~10.5 MB fp16)
# with DS. Keeping layer4 (``stages=4, fpn_channels=64, representation_size=128``)
# gives ~12.3 M (~24.6 MB), too close to the 25 MB cap and slow to train on CPU.
SPINE_LIGHT_ARGS: dict[str, object] = {
    "trunk": "resnet18",
    "stages": 3,
    "fpn_channels": 128,
    "representation_size": 256,
}


def _attention_factory(backbone: str, reduction: int, groups: int) -> Callable[[int], nn.Module] | None:
    """``channels -> attention module`` for the named spine backbone (None for plain 'resnet50')."""
    if backbone not in SPINE_BACKBONES:
        raise ValueError(f"unknown spine backbone {backbone!r}; expected one of {sorted(SPINE_BACKBONES)}")
    kind = SPINE_BACKBONES[backbone]
    if kind == "none":
        return None
    return functools.partial(_attention, kind=kind, reduction=reduction, groups=groups)


def build_spine_detector(
    backbone: str = "resnet50_ds",
    *,
    trunk: str = "resnet50",
    stages: int = 4,
    num_classes: int = len(SPINE_CLASSES) + 1,
    in_channels: int = 3,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    reduction: int = 16,
    attention_groups: int = 32,
    min_size: int = 512,
    max_size: int = 1024,
    anchor_base: int = 32,
    frozen_bn: bool = False,
    trainable_stages: int = 5,
    pretrained_path: str | None = None,
    box_score_thresh: float = 0.05,
    detections_per_img: int = 20,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> FasterRCNN:
    """Build the spine vertebra detector/classifier.

    Parameters
    ----------
    backbone : str
        'resnet50', 'resnet50_se', 'resnet50_sk' or 'resnet50_ds' (the attention module; the paper's variants).
    trunk : str
        ResNet depth under the attention: 'resnet50' (faithful) or 'resnet18' (light demo variant, see
        ``SPINE_LIGHT_ARGS``).
    stages : int
        Residual stages kept: 4 (faithful; the second module follows stage 5 = ``layer4``) or 3 (drops
        ``layer4``; the second module then follows the last kept stage, used by the light variant).
    num_classes : int
        Including background: 1 + 3 (normal/osteopenia/osteoporosis).
    in_channels : int
        3 (bone-window slice replicated, the paper's COCO setting) or 1.
    fpn_channels, representation_size : int
        FPN width and box-head width (256 / 1024 as in torchvision).
    reduction, attention_groups : int
        Attention FC reduction ratio (16) and conv groups (see ``DSModule``).
    min_size, max_size : int
        Resize bounds: CT slices are 512x512, so 512 keeps native resolution (torchvision's 800 would
        upsample for no gain).
    image_mean, image_std : sequence of float, optional
        Normalisation of the [0, 1] input; ImageNet statistics by default (mean 0.5 / std 0.25 for one channel).
    """
    if in_channels != 3 and image_mean is None:
        image_mean, image_std = [0.5] * in_channels, [0.25] * in_channels
    bb = resnet_fpn_backbone(
        trunk, in_channels=in_channels, stages=stages, fpn_channels=fpn_channels, extra="maxpool", returned_from=1,
        frozen_bn=frozen_bn, trainable_stages=trainable_stages, pretrained_path=pretrained_path,
        attention=_attention_factory(backbone, reduction, attention_groups),
    )
    return faster_rcnn(
        bb, num_classes, min_size=min_size, max_size=max_size, representation_size=representation_size,
        anchor_base=anchor_base, image_mean=image_mean, image_std=image_std, box_score_thresh=box_score_thresh,
        box_detections_per_img=detections_per_img,
    )


def _attention(channels: int, *, kind: str, reduction: int, groups: int) -> nn.Module:
    """Module factory passed to the backbone builder."""
    return build_attention(kind, channels, reduction=reduction, groups=groups)


def param_table(**kwargs: object) -> list[dict[str, object]]:
    """Parameter counts of the four backbone variants, built with ``kwargs`` (e.g. ``SPINE_LIGHT_ARGS``).

    Returns
    -------
    list of dict
        One row per variant with keys ``backbone``, ``attention_params`` (both
        modules), ``backbone_params`` (trunk + attention + FPN),
        ``detector_params`` (whole Faster R-CNN) and ``fp16_mb`` (parameters
        only, MB = 1e6 bytes).
    """
    rows: list[dict[str, object]] = []
    for name in SPINE_BACKBONES:
        model = build_spine_detector(name, **kwargs)
        body = model.backbone.body
        attn = sum(p.numel() for n, m in body.named_children() if n.startswith("attn") for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
        rows.append({
            "backbone": name,
            "attention_params": attn,
            "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
            "detector_params": total,
            "fp16_mb": round(total * 2 / 1e6, 1),
        })
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Markdown table of :func:`param_table` rows."""
    lines = [
        "| backbone | attention params | backbone+FPN params | Faster R-CNN params | fp16 MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['attention_params']:,} | {r['backbone_params']:,} | "
            f"{r['detector_params']:,} | {r['fp16_mb']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m inference.nets.spine_detector --param-table [--light]``."""
    ap = argparse.ArgumentParser(
        prog="python -m inference.nets.spine_detector", description="DSNet spine detector utilities"
    )
    ap.add_argument("--param-table", action="store_true", help="print the backbone parameter table (markdown)")
    ap.add_argument("--light", action="store_true", help="also print the light (demo bundle) variant's table")
    args = ap.parse_args(argv)
    if not args.param_table:
        ap.print_help()
        return 2
    print("Faithful (ResNet50 trunk, FPN 256, box head 1024):\n")
    print(format_table(param_table()))
    if args.light:
        print(f"\nLight demo variant {SPINE_LIGHT_ARGS}:\n")
        print(format_table(param_table(**SPINE_LIGHT_ARGS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
