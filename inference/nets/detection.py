"""Box detectors: ResNet-FPN backbones and the physis fracture/metal/text detector.

The physis task (``tasks/physis_fracture.md``) uses torchvision's Faster R-CNN
or RetinaNet with a ResNet50-FPN backbone. Nothing is ever downloaded:
torchvision is called with ``weights=None``; ImageNet weights for the ResNet
trunk may be supplied as a local file (``pretrained_path``).

:func:`resnet_fpn_backbone` is shared with :mod:`inference.nets.spine_detector`,
which inserts attention modules after the stem and after the last stage.

Light variant (for demo bundles under the 25 MB fp16 cap): ``backbone="resnet18"``
with ``stages=3`` (layer4 dropped, output strides 4/8/16 plus a pooled level),
``fpn_channels=128`` and ``representation_size=256``; see ``PHYSIS_LIGHT_ARGS``
and the parameter table in ``inference/nets/README.md``.

Label indices: 0 is background, then ``DETECTION_CLASSES`` in order (1-based),
for both Faster R-CNN and RetinaNet.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from inference.errors import BundleError

log = logging.getLogger(__name__)

__all__ = [
    "DETECTION_CLASSES",
    "PHYSIS_LIGHT_ARGS",
    "RESNET_STAGE_CHANNELS",
    "build_physis_detector",
    "load_resnet_weights",
    "resnet_fpn_backbone",
]

DETECTION_CLASSES: tuple[str, ...] = ("fracture", "metal", "text")

PHYSIS_LIGHT_ARGS: dict[str, object] = {
    "backbone": "resnet18",
    "stages": 3,
    "fpn_channels": 128,
    "representation_size": 256,
}

# Output channels of layer1..layer4 for each supported trunk.
RESNET_STAGE_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}
_STEM_CHANNELS = 64


def load_resnet_weights(model: nn.Module, path: str | Path, in_channels: int) -> None:
    """Load a local torchvision ResNet state_dict (e.g. ImageNet) into ``model``.

    The ``fc`` layer is skipped. When ``in_channels`` is 1 the RGB ``conv1``
    kernel is summed over its input channels, which equals feeding the grey
    image replicated to 3 channels.

    Raises
    ------
    BundleError
        If the file is missing, unreadable or does not fit the architecture.
    """
    p = Path(path)
    if not p.is_file():
        raise BundleError(f"pretrained weights not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise BundleError(f"cannot read pretrained weights {p}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] == 3 and in_channels == 1:
        state["conv1.weight"] = w.sum(dim=1, keepdim=True)
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise BundleError(f"pretrained weights {p} do not fit the network (shape mismatch in {bad[:3]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise BundleError(f"pretrained weights {p} do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    log.info("loaded pretrained trunk weights from %s", p.name)


def _resnet_trunk(
    backbone: str, in_channels: int, frozen_bn: bool, pretrained_path: str | Path | None
) -> torchvision.models.ResNet:
    """A torchvision ResNet (never downloaded) with ``in_channels`` input channels."""
    if backbone not in RESNET_STAGE_CHANNELS:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {sorted(RESNET_STAGE_CHANNELS)}")
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    model = getattr(torchvision.models, backbone)(weights=None, norm_layer=norm)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if pretrained_path is not None:
        load_resnet_weights(model, pretrained_path, in_channels)
    return model


def _trunk_body(
    trunk: nn.Module, stages: int, chans: Sequence[int], attention: Callable[[int], nn.Module] | None,
) -> tuple[nn.Sequential, str]:
    """The stem and the first ``stages`` residual stages (with optional attention); and the last module's name."""
    parts: list[tuple[str, nn.Module]] = [
        ("conv1", trunk.conv1), ("bn1", trunk.bn1), ("relu", trunk.relu), ("maxpool", trunk.maxpool)
    ]
    if attention is not None:
        parts.append(("attn_stem", attention(_STEM_CHANNELS)))
    for i in range(1, stages + 1):
        parts.append((f"layer{i}", getattr(trunk, f"layer{i}")))
    last_name = f"layer{stages}"
    if attention is not None:
        parts.append(("attn_last", attention(chans[stages - 1])))
        last_name = "attn_last"
    return nn.Sequential(OrderedDict(parts)), last_name


def _freeze_lowest_stages(body: nn.Module, stages: int, trainable_stages: int) -> None:
    """Freeze all but the top ``trainable_stages`` stages (stage 1 = stem, stages 2.. = layer1..)."""
    stage_modules: list[list[str]] = [["conv1", "bn1"]] + [[f"layer{i}"] for i in range(1, stages + 1)]
    n_frozen = max(0, len(stage_modules) - int(trainable_stages))
    for names in stage_modules[:n_frozen]:
        for name in names:
            for prm in getattr(body, name).parameters():
                prm.requires_grad_(False)


def _extra_block(extra: str, fpn_channels: int) -> LastLevelMaxPool | LastLevelP6P7:
    """The FPN's extra level: 'maxpool' (Faster R-CNN) or 'p6p7' (RetinaNet)."""
    if extra == "maxpool":
        return LastLevelMaxPool()
    if extra == "p6p7":
        return LastLevelP6P7(fpn_channels, fpn_channels)
    raise ValueError(f"extra must be 'maxpool' or 'p6p7', got {extra!r}")


def resnet_fpn_backbone(
    backbone: str = "resnet50",
    *,
    in_channels: int = 3,
    stages: int = 4,
    fpn_channels: int = 256,
    extra: str = "maxpool",
    returned_from: int = 1,
    frozen_bn: bool = False,
    trainable_stages: int = 5,
    pretrained_path: str | Path | None = None,
    attention: Callable[[int], nn.Module] | None = None,
) -> BackboneWithFPN:
    """Build a ResNet + FPN backbone, optionally with attention after the stem and the last stage.

    Stage naming (as in the ResNet paper and DSNet's Figure 3): stage 1 is
    torchvision's stem ``conv1, bn1, relu, maxpool``; stages 2-5 are
    ``layer1`` ... ``layer4``. With ``attention`` set, the trunk becomes
    ``conv1, bn1, relu, maxpool, attn_stem, layer1, ..., layerS, attn_last``
    where ``S = stages`` and the FPN reads the last level after ``attn_last``.

    Parameters
    ----------
    backbone : str
        'resnet18', 'resnet34' or 'resnet50'.
    in_channels : int
        Image channels (3, or 1 for grey).
    stages : int
        Residual stages kept (3 drops layer4, 4 keeps all).
    fpn_channels : int
        FPN output channels.
    extra : str
        'maxpool' (Faster R-CNN: one extra pooled level) or 'p6p7' (RetinaNet).
    returned_from : int
        First residual stage fed to the FPN (1 = layer1; RetinaNet uses 2).
    frozen_bn : bool
        Use FrozenBatchNorm2d (for fine-tuning pretrained trunks with tiny batches).
    trainable_stages : int
        How many of the 5 stages (counted from the top) are trainable.
    pretrained_path : path, optional
        Local torchvision ResNet state_dict for the trunk.
    attention : callable, optional
        ``channels -> nn.Module``, inserted after the stem and after the last stage.
    """
    if not 3 <= stages <= 4:
        raise ValueError(f"stages must be 3 or 4, got {stages}")
    if not 1 <= returned_from <= stages:
        raise ValueError(f"returned_from must lie in 1..{stages}, got {returned_from}")
    trunk = _resnet_trunk(backbone, in_channels, frozen_bn, pretrained_path)
    chans = RESNET_STAGE_CHANNELS[backbone]
    body, last_name = _trunk_body(trunk, stages, chans, attention)
    _freeze_lowest_stages(body, stages, trainable_stages)
    return_layers: dict[str, str] = {}
    in_list: list[int] = []
    for idx, i in enumerate(range(returned_from, stages + 1)):
        name = last_name if i == stages else f"layer{i}"
        return_layers[name] = str(idx)
        in_list.append(chans[i - 1])
    extra_block = _extra_block(extra, fpn_channels)
    return BackboneWithFPN(body, return_layers, in_list, fpn_channels, extra_blocks=extra_block)


def n_feature_maps(backbone: BackboneWithFPN) -> int:
    """Number of feature maps the FPN returns (returned stages + extra levels)."""
    n = len(backbone.body.return_layers)
    extra = backbone.fpn.extra_blocks
    if isinstance(extra, LastLevelP6P7):
        return n + 2
    return n + 1


def faster_rcnn(
    backbone: BackboneWithFPN,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    representation_size: int = 1024,
    anchor_base: int = 32,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    **kwargs: object,
) -> FasterRCNN:
    """Faster R-CNN on an FPN backbone with anchors ``anchor_base * 2**i`` per level."""
    n = n_feature_maps(backbone)
    sizes = tuple((anchor_base * 2**i,) for i in range(n))
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * n)
    names = [str(i) for i in range(n - 1)]  # RoIAlign on the FPN levels, not the pooled one
    roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2)
    c = backbone.out_channels
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean) if image_mean is not None else None,
        image_std=list(image_std) if image_std is not None else None,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(c * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        **kwargs,
    )


class BackgroundFreeRetinaNet(RetinaNet):
    """torchvision RetinaNet that never reports class index 0.

    RetinaNet scores every class with an independent sigmoid, so index 0 is a
    real output slot. To keep one label convention for both detector kinds
    (0 = background, classes from 1), training targets never use 0 and its
    detections are dropped here.
    """

    def postprocess_detections(self, head_outputs, anchors, image_shapes):  # type: ignore[no-untyped-def]
        """Run torchvision's post-processing, then drop label-0 detections."""
        dets = super().postprocess_detections(head_outputs, anchors, image_shapes)
        out = []
        for d in dets:
            keep = d["labels"] != 0
            out.append({k: v[keep] for k, v in d.items()})
        return out


def retinanet(
    backbone: BackboneWithFPN,
    num_classes: int,
    *,
    min_size: int,
    max_size: int,
    anchor_base: int = 32,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    **kwargs: object,
) -> RetinaNet:
    """RetinaNet on an FPN backbone, 3 scales x 3 ratios per level; label 0 is never reported."""
    n = n_feature_maps(backbone)
    sizes = tuple(
        (b, int(b * 2 ** (1 / 3)), int(b * 2 ** (2 / 3))) for b in (anchor_base * 2**i for i in range(n))
    )
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * n)
    return BackgroundFreeRetinaNet(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean) if image_mean is not None else None,
        image_std=list(image_std) if image_std is not None else None,
        anchor_generator=anchors,
        **kwargs,
    )


def build_physis_detector(
    kind: str = "faster_rcnn",
    backbone: str = "resnet50",
    *,
    num_classes: int = len(DETECTION_CLASSES) + 1,
    in_channels: int = 3,
    stages: int = 4,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    min_size: int = 1024,
    max_size: int = 1536,
    anchor_base: int = 32,
    frozen_bn: bool = False,
    trainable_stages: int = 5,
    pretrained_path: str | None = None,
    box_score_thresh: float = 0.05,
    detections_per_img: int = 100,
) -> nn.Module:
    """The physis detector: Faster R-CNN or RetinaNet with a ResNet-FPN backbone.

    Faithful default: ResNet50-FPN, Faster R-CNN, images resized so the short
    side is ``min_size`` = 1024 (long side up to ``max_size``), as the spec
    asks for a detector input long side >= 1024. Inputs are lists of
    ``(C, H, W)`` float tensors in [0, 1]; torchvision normalises them with
    ImageNet statistics (grey replicated to 3 channels) or mean 0.5 / std 0.25
    for ``in_channels=1``. ``num_classes`` counts the background (index 0).

    Parameters
    ----------
    kind : str
        'faster_rcnn' or 'retinanet'.
    backbone : str
        'resnet50' (faithful) or 'resnet18' / 'resnet34' (light).
    stages, fpn_channels, representation_size : int
        Light-variant knobs (see ``PHYSIS_LIGHT_ARGS``); ``representation_size``
        is the Faster R-CNN box-head width (ignored by RetinaNet).
    min_size, max_size : int
        torchvision's resize bounds.
    """
    mean, std = (None, None) if in_channels == 3 else ([0.5] * in_channels, [0.25] * in_channels)
    if kind == "faster_rcnn":
        bb = resnet_fpn_backbone(
            backbone, in_channels=in_channels, stages=stages, fpn_channels=fpn_channels, extra="maxpool",
            returned_from=1, frozen_bn=frozen_bn, trainable_stages=trainable_stages, pretrained_path=pretrained_path,
        )
        return faster_rcnn(
            bb, num_classes, min_size=min_size, max_size=max_size, representation_size=representation_size,
            anchor_base=anchor_base, image_mean=mean, image_std=std, box_score_thresh=box_score_thresh,
            box_detections_per_img=detections_per_img,
        )
    if kind == "retinanet":
        bb = resnet_fpn_backbone(
            backbone, in_channels=in_channels, stages=stages, fpn_channels=fpn_channels, extra="p6p7",
            returned_from=2, frozen_bn=frozen_bn, trainable_stages=trainable_stages, pretrained_path=pretrained_path,
        )
        return retinanet(
            bb, num_classes, min_size=min_size, max_size=max_size, anchor_base=anchor_base, image_mean=mean,
            image_std=std, score_thresh=box_score_thresh, detections_per_img=detections_per_img,
        )
    raise ValueError(f"unknown detector kind {kind!r}; expected 'faster_rcnn' or 'retinanet'")
