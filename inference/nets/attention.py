"""Channel-attention modules for the spine backbone: DS (DSNet), SE and SK.

The dual-selective (DS) module follows Xue et al. 2022 ("A dual-selective
channel attention network for osteoporosis prediction in CT images of lumbar
spine", section 2.3 and Figure 2c) as restated in ``tasks/spine_bmd.md``.
The paper gives the structure only in words and two formulas (global average
pooling, a "full convolution" ``x W + B``). Every detail it leaves open is
decided here and written down in :class:`DSModule`'s docstring, so that the
comparison with the SE (Hu et al., 2018) and SK (Li et al., 2019) baselines
is reproducible.

All three modules map ``(N, C, H, W) -> (N, C, H, W)`` so that they can be
inserted at the same places of a ResNet (see :mod:`inference.nets.spine_detector`).
Each module stores the attention weights of its last forward pass in
``last_weights`` (detached) for tests and for inspection.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DSModule", "SEBlock", "SKBlock", "build_attention", "ATTENTION_KINDS"]


def _groups_for(channels: int, groups: int) -> int:
    """Largest divisor of ``channels`` that is <= ``groups`` (at least 1)."""
    g = max(1, min(int(groups), channels))
    while channels % g:
        g -= 1
    return g


def _conv_bn_relu(channels: int, kernel_size: int, dilation: int, groups: int) -> nn.Sequential:
    """``kernel_size`` conv (same padding, no bias) + BatchNorm + ReLU, channels preserved."""
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size, padding=padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class _ChannelGate(nn.Module):
    """GAP vector -> FC (C -> C/r) -> ReLU -> FC (C/r -> C) -> sigmoid, as in SE.

    Parameters
    ----------
    channels : int
        Number of channels C.
    reduction : int
        Reduction ratio r; the hidden width is ``max(C // r, min_hidden)``.
    min_hidden : int
        Lower bound on the hidden width so that 64-channel inputs keep >= 4 units.
    """

    def __init__(self, channels: int, reduction: int = 16, min_hidden: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, min_hidden)
        self.fc1 = nn.Linear(channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Map (N, C) pooled features to (N, C) weights in [0, 1]."""
        return torch.sigmoid(self.fc2(self.relu(self.fc1(pooled))))


class DSModule(nn.Module):
    """Dual-selective channel attention (DSNet), ``(N, C, H, W) -> (N, C, H, W)``.

    Computation::

        u3 = ReLU(BN(conv3x3(x)))            # branch 1
        u5 = ReLU(BN(conv5x5(x)))            # branch 2
        w3 = sigmoid(FC(ReLU(FC(GAP(u3)))))  # per-channel weights of branch 1
        w5 = sigmoid(FC(ReLU(FC(GAP(u5)))))  # per-channel weights of branch 2
        v  = w3 * u3 + w5 * u5               # "the two fused branches are superimposed"
        y  = x + BN(dilated_conv3x3_d2(v))   # fusion conv and residual connection

    Choices the paper leaves open, decided here:

    * Branch convolutions keep the channel count C, use "same" padding and are
      followed by BatchNorm and ReLU (the paper shows "3x3" and "5x5"
      transformations as in SKNet, whose branches are conv-BN-ReLU).
    * The branches and the fusion conv are *grouped* convolutions with
      ``groups`` groups (default 32, SKNet's cardinality). The paper gives no
      group count; dense convs would add ~43 C^2 weights, i.e. ~180 M
      parameters after ResNet50's stage 5 (C = 2048), which contradicts the
      near-identical speed the paper reports for ResNet50 and ResNet50+DS.
      ``groups=1`` gives the dense variant.
    * The 5x5 branch is a true 5x5 kernel (not SKNet's dilated 3x3), as the
      paper names kernel sizes 3 and 5.
    * "Full convolution" = two fully connected layers C -> C/r -> C with a ReLU
      between and a sigmoid out, r = 16 (the SE bottleneck), hidden width at
      least 4. Each branch has its own FC pair ("dual-selective": each branch
      is weighted by its own attention, unlike SK's shared softmax).
    * The weighted branches are summed (not concatenated), so the fusion conv
      maps C -> C: a 3x3 conv with dilation 2 (padding 2), followed by
      BatchNorm and *no* activation before the residual addition, as in a
      ResNet block's last conv; the residual is the identity ``x``.
    * The fusion BN's scale is initialised to zero when ``zero_init_residual``
      is true (default), so that a freshly inserted module starts as the
      identity and does not disturb pretrained backbone features.

    Parameters
    ----------
    channels : int
        Number of input and output channels.
    reduction : int
        FC reduction ratio (16 in the spec).
    groups : int
        Groups of the branch and fusion convolutions (reduced to a divisor of C).
    zero_init_residual : bool
        Initialise the fusion BN weight to 0 (module starts as the identity).
    """

    def __init__(self, channels: int, reduction: int = 16, groups: int = 32, zero_init_residual: bool = True) -> None:
        super().__init__()
        g = _groups_for(channels, groups)
        self.branch3 = _conv_bn_relu(channels, 3, 1, g)
        self.branch5 = _conv_bn_relu(channels, 5, 1, g)
        self.gate3 = _ChannelGate(channels, reduction)
        self.gate5 = _ChannelGate(channels, reduction)
        self.fuse = nn.Conv2d(channels, channels, 3, padding=2, dilation=2, groups=g, bias=False)
        self.fuse_bn = nn.BatchNorm2d(channels)
        if zero_init_residual:
            nn.init.zeros_(self.fuse_bn.weight)
        self.last_weights: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module."""
        u3 = self.branch3(x)
        u5 = self.branch5(x)
        w3 = self.gate3(u3.mean(dim=(2, 3)))
        w5 = self.gate5(u5.mean(dim=(2, 3)))
        self.last_weights = (w3.detach(), w5.detach())
        v = u3 * w3[:, :, None, None] + u5 * w5[:, :, None, None]
        return x + self.fuse_bn(self.fuse(v))


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al.): ``y = x * sigmoid(FC(ReLU(FC(GAP(x)))))``.

    Used as a stand-alone module at the same insertion points as DS (not
    inside every bottleneck as in SE-ResNet), so that the comparison changes
    only the attention module.

    Parameters
    ----------
    channels : int
        Number of channels.
    reduction : int
        FC reduction ratio (16 as in the paper).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.gate = _ChannelGate(channels, reduction)
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module."""
        w = self.gate(x.mean(dim=(2, 3)))
        self.last_weights = w.detach()
        return x * w[:, :, None, None]


class SKBlock(nn.Module):
    """Selective kernel (Li et al.), two branches, softmax attention across branches.

    Branch 1 is a 3x3 conv, branch 2 a 3x3 conv with dilation 2 (a 5x5
    receptive field, as in SKNet), both grouped conv-BN-ReLU. Fuse:
    ``s = GAP(u1 + u2)``, ``z = ReLU(FC(s))`` with width
    ``max(C // reduction, min_hidden)`` (SKNet's L = 32; SKNet puts a BN in
    this FC, left out here because detection batches may hold a single image
    and the FC has a bias instead), then one FC per branch
    gives logits ``a_k`` and the softmax over k gives per-channel weights
    summing to 1 across the branches. Output ``y = a_1 * u1 + a_2 * u2``.
    There is no residual connection, as in the SK unit itself.

    Parameters
    ----------
    channels : int
        Number of channels.
    reduction : int
        Reduction ratio r (16).
    groups : int
        Groups of the branch convolutions (32 in SKNet).
    min_hidden : int
        Minimum width of the fuse layer (SKNet's L = 32).
    """

    def __init__(self, channels: int, reduction: int = 16, groups: int = 32, min_hidden: int = 32) -> None:
        super().__init__()
        g = _groups_for(channels, groups)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(channels, 3, 1, g), _conv_bn_relu(channels, 3, 2, g)]
        )
        hidden = max(channels // reduction, min_hidden)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True))
        self.selectors = nn.ModuleList([nn.Linear(hidden, channels) for _ in self.branches])
        self.last_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module."""
        feats = torch.stack([b(x) for b in self.branches], dim=1)  # (N, K, C, H, W)
        z = self.fc(feats.sum(dim=1).mean(dim=(2, 3)))  # (N, hidden)
        logits = torch.stack([sel(z) for sel in self.selectors], dim=1)  # (N, K, C)
        a = torch.softmax(logits, dim=1)
        self.last_weights = a.detach()
        return (feats * a[:, :, :, None, None]).sum(dim=1)


ATTENTION_KINDS: tuple[str, ...] = ("none", "se", "sk", "ds")


def build_attention(kind: str, channels: int, reduction: int = 16, groups: int = 32) -> nn.Module:
    """Return an attention module of ``kind`` ('none', 'se', 'sk' or 'ds') for ``channels``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "se":
        return SEBlock(channels, reduction)
    if kind == "sk":
        return SKBlock(channels, reduction, groups)
    if kind == "ds":
        return DSModule(channels, reduction, groups)
    raise ValueError(f"unknown attention kind {kind!r}; expected one of {ATTENTION_KINDS}")
