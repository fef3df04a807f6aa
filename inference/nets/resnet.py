"""Image classifiers (ResNet18/34/50, MobileNetV2) and Grad-CAM.

* ``wrist_fracture``: ResNet18, one grey input channel, one logit (sigmoid
  applied by the caller). With locally supplied ImageNet weights
  (``pretrained_path``; never downloaded) the RGB stem is summed over its
  input channels, which is the same as feeding grey replicated to 3 channels.
* ``physis_fracture``: ResNet50 on the whole image and on detector crops, and
  a MobileNetV2 baseline.

Every classifier returns raw logits of shape ``(N, num_outputs)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from inference.nets.detection import load_resnet_weights

log = logging.getLogger(__name__)

__all__ = ["MobileNetV2Classifier", "ResNetClassifier", "gradcam"]

_RESNETS = ("resnet18", "resnet34", "resnet50")
_LAST_CHANNELS = {"resnet18": (256, 512), "resnet34": (256, 512), "resnet50": (1024, 2048)}


class ResNetClassifier(nn.Module):
    """A torchvision ResNet with a configurable input and output width.

    Parameters
    ----------
    backbone : str
        'resnet18' (wrist), 'resnet34' or 'resnet50' (physis).
    in_channels : int
        1 for grey radiographs, or 3. A 1-channel input given to a 3-channel
        model is replicated to 3 channels.
    num_outputs : int
        Number of logits (1 for a binary sigmoid output).
    stages : int
        Residual stages kept: 4 (standard) or 3 (drops ``layer4``; a light
        variant for demo bundles, ~2.8 M parameters for ResNet18).
    dropout : float
        Dropout before the final linear layer (0 = none, as in torchvision).
    pretrained_path : str, optional
        Local torchvision ResNet state_dict (ImageNet) for the trunk.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_channels: int = 1,
        num_outputs: int = 1,
        stages: int = 4,
        dropout: float = 0.0,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        if backbone not in _RESNETS:
            raise ValueError(f"unknown backbone {backbone!r}; expected one of {_RESNETS}")
        if stages not in (3, 4):
            raise ValueError(f"stages must be 3 or 4, got {stages}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        net = getattr(torchvision.models, backbone)(weights=None)
        if in_channels == 1:
            net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained_path is not None:
            load_resnet_weights(net, Path(pretrained_path), in_channels)
        if stages == 3:
            net.layer4 = nn.Identity()
        width = _LAST_CHANNELS[backbone][stages - 3]
        net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_outputs)) if dropout > 0 else nn.Linear(
            width, num_outputs
        )
        self.net = net
        self.in_channels = in_channels

    @property
    def last_conv_block(self) -> nn.Module:
        """The last convolutional block (Grad-CAM's default target layer)."""
        return self.net.layer4 if not isinstance(self.net.layer4, nn.Identity) else self.net.layer3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_outputs)`` for images ``(N, C, H, W)``."""
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)


class MobileNetV2Classifier(nn.Module):
    """torchvision MobileNetV2 (never downloaded) with a grey stem and ``num_outputs`` logits.

    Parameters
    ----------
    in_channels : int
        1 or 3.
    num_outputs : int
        Number of logits.
    width_mult : float
        MobileNetV2 width multiplier.
    dropout : float
        Classifier dropout (0.2 as in torchvision).
    """

    def __init__(self, in_channels: int = 1, num_outputs: int = 1, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult, dropout=dropout)
        if in_channels != 3:
            first = net.features[0][0]
            net.features[0][0] = nn.Conv2d(
                in_channels, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False
            )
        net.classifier[-1] = nn.Linear(net.last_channel, num_outputs)
        self.net = net

    @property
    def last_conv_block(self) -> nn.Module:
        """The last convolutional block (Grad-CAM's default target layer)."""
        return self.net.features[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, num_outputs)``."""
        return self.net(x)


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    target_layer: nn.Module | None = None,
    output_index: int = 0,
) -> torch.Tensor:
    """Grad-CAM heat maps (Selvaraju et al.) at input resolution, each scaled to [0, 1].

    The map is ``ReLU(sum_k alpha_k A_k)`` with ``A`` the target layer's
    activations and ``alpha_k`` the spatial mean of d(logit)/dA_k, bilinearly
    upsampled to the input size and divided by its maximum. A map whose
    maximum is 0 (no positive evidence) is returned as all zeros.

    Parameters
    ----------
    model : nn.Module
        A classifier returning ``(N, K)`` logits; put it in eval mode first.
    x : torch.Tensor
        Input batch ``(N, C, H, W)``.
    target_layer : nn.Module, optional
        Layer whose output is explained; defaults to ``model.last_conv_block``.
    output_index : int
        Which logit to explain.

    Returns
    -------
    torch.Tensor
        ``(N, H, W)`` float tensor in [0, 1] (detached, on ``x``'s device).
    """
    if target_layer is None:
        target_layer = getattr(model, "last_conv_block", None)
        if target_layer is None:
            raise ValueError("model has no last_conv_block; pass target_layer")
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store["act"] = out

    handle = target_layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xin = x.detach().clone().requires_grad_(True)
            logits = model(xin)
            if "act" not in store:
                raise ValueError("target_layer was not used in the forward pass")
            act = store["act"]
            (grad,) = torch.autograd.grad(logits[:, output_index].sum(), act)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    cam = cam / peak
    return cam.clamp_(0.0, 1.0)
