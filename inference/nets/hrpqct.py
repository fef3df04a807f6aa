"""Motion-grade CNN for HR-pQCT slices (after Walle et al., Bone 2023).

Five blocks of 3x3 conv + LeakyReLU + 2x2 max-pool with 32-64-128-256-256
channels, global average pooling, a dense layer with ReLU and a 5-class
output (``tasks/hrpqct_motion.md``). Input: one slice ``(N, 1, 256, 256)``;
the 8 slices of a scan are a batch of 8 and the scan grade is aggregated by
the task from the per-slice probabilities.

Choices the source leaves open, decided here: "same" padding (256 -> 8 after
five pools); LeakyReLU slope 0.01 (PyTorch's default; Keras' default is 0.3,
configurable); dense width 128; no BatchNorm by default (the description has
none; ``batch_norm=True`` adds one after each conv); optional dropout before
the output layer (default 0). ``forward`` returns logits; the softmax is
applied by the loss (cross-entropy) or by :meth:`MotionGradeCNN.predict_proba`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MotionGradeCNN"]


class MotionGradeCNN(nn.Module):
    """5-block CNN classifying a slice into motion grades 1-5 (class indices 0-4).

    Parameters
    ----------
    in_channels : int
        Input channels (1).
    num_classes : int
        Number of grades (5).
    channels : sequence of int
        Conv widths of the blocks (32, 64, 128, 256, 256).
    hidden : int
        Width of the dense ReLU layer.
    negative_slope : float
        LeakyReLU slope.
    batch_norm : bool
        Add BatchNorm after each conv (off in the faithful configuration).
    dropout : float
        Dropout before the output layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        channels: Sequence[int] = (32, 64, 128, 256, 256),
        hidden: int = 128,
        negative_slope: float = 0.01,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers.append(nn.Conv2d(prev, c, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers += [nn.LeakyReLU(negative_slope, inplace=True), nn.MaxPool2d(2)]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return grade logits ``(N, num_classes)`` for slices ``(N, 1, H, W)``."""
        return self.head(self.pool(self.features(x)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(N, num_classes)``."""
        return torch.softmax(self.forward(x), dim=1)
