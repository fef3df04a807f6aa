"""2D U-Net for knee bone segmentation (femur, tibia, fibula).

Faithful configuration (``tasks/knee_bone_seg.md``): depth 4 (224 -> 112 ->
56 -> 28 -> 14 at the bottleneck), two 3x3 convs per level, a constant 32
channels, ELU, one dropout of 0.5 at the bottleneck, up-sampling followed by
a 2x2 conv and concatenation with the skip, and a 1x1 output conv with one
sigmoid channel per bone. That gives 211,011 parameters for 1 input and 3
output channels (``FAITHFUL_PARAMS``), matching the thesis's "about 211k".

Choices left open, decided here (as in the original U-Net / its Keras
reference implementation): "same" padding everywhere, so output size equals
input size (H and W must be divisible by ``2**depth``); nearest-neighbour
up-sampling by 2 then a 2x2 conv padded on the right/bottom (Keras 'same')
followed by ELU; dropout after the bottleneck's second conv; no
normalisation layers. ``forward`` returns logits; apply a sigmoid per
channel for probabilities.

Initialisation (``init="keras"``, the default): Glorot-uniform weights and zero
biases, the Keras defaults the thesis's network was built with. PyTorch's own
default (``init="torch"``) is not a neutral substitute for this network without
normalisation layers: measured on synthetic knee slices (Adam 1e-3, batch 8,
same seed and data), its logits reached |7,000|-|200,000| within 50 steps, the
sigmoids saturated and the loss sat at 0.67 after 250 steps (a 40-volume CPU
run then diverged to an all-fibula output); with Glorot init the logits stayed
at a few hundred and the loss reached 0.47 by step 150 (models/README.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["FAITHFUL_PARAMS", "UNet2D"]

FAITHFUL_PARAMS = 211_011


def _keras_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every conv (Keras's defaults), in place."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convs with ELU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.ELU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.ELU(inplace=True),
    )


class _Up(nn.Module):
    """Up-sample x2, 2x2 conv + ELU, concatenate the skip, two 3x3 convs."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv_up = nn.Conv2d(cin, cout, 2)
        self.act = nn.ELU(inplace=True)
        self.convs = _double_conv(cout + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decode one level."""
        x = self.act(self.conv_up(F.pad(self.up(x), (0, 1, 0, 1))))
        return self.convs(torch.cat([skip, x], dim=1))


class UNet2D(nn.Module):
    """Configurable 2D U-Net; defaults are the thesis's faithful configuration.

    Parameters
    ----------
    in_channels : int
        Input channels (1 MR slice).
    n_classes : int
        Output channels, one sigmoid per bone (3: femur, tibia, fibula).
    base_channels : int
        Channels at the first level (32).
    depth : int
        Number of pooling steps (4: 224 -> 14).
    channel_growth : float
        Channel multiplier per level (1.0 = constant, as in the thesis).
    dropout : float
        Dropout at the bottleneck (0.5).
    init : {"keras", "torch"}
        Glorot-uniform weights and zero biases (the thesis's Keras defaults), or
        PyTorch's default initialisation (see the module docstring for why not).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 3,
        base_channels: int = 32,
        depth: int = 4,
        channel_growth: float = 1.0,
        dropout: float = 0.5,
        init: str = "keras",
    ) -> None:
        super().__init__()
        if init not in ("keras", "torch"):
            raise ValueError(f"init must be 'keras' or 'torch', got {init!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [max(1, int(round(base_channels * channel_growth**i))) for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList()
        prev = in_channels
        for w in widths[:-1]:
            self.down.append(_double_conv(prev, w))
            prev = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _double_conv(prev, widths[-1])
        self.dropout = nn.Dropout(dropout)
        self.up = nn.ModuleList()
        prev = widths[-1]
        for w in reversed(widths[:-1]):
            self.up.append(_Up(prev, w, w))
            prev = w
        self.head = nn.Conv2d(prev, n_classes, 1)
        if init == "keras":
            _keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(N, n_classes, H, W)``; H and W must be divisible by ``2**depth``."""
        factor = 2**self.depth
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by {factor}")
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.bottleneck(x))
        for block, skip in zip(self.up, reversed(skips), strict=True):
            x = block(x, skip)
        return self.head(x)
