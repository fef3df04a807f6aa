"""Losses that belong with the networks (and the Dice score they optimise).

* :class:`SoftDiceLoss` - soft Dice (F1) per sample and channel for the knee
  U-Net's sigmoid channels; an empty prediction on an empty target scores 1.
* :class:`FocalLoss` and :func:`class_weights` - for imbalanced classes
  (focal loss of Lin et al.; inverse-frequency or effective-number weights).
* :class:`OrdinalGradeLoss` - for motion grades: cross-entropy plus the L1
  distance between the expected grade and the true grade, so that confusing
  grade 1 with 5 costs more than 1 with 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "FocalLoss",
    "OrdinalGradeLoss",
    "SoftDiceLoss",
    "class_weights",
    "dice_score",
    "expected_grade",
    "soft_dice",
]


def soft_dice(probs: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice per sample and channel, ``(N, C)``.

    ``(2 |P T| + s) / (|P| + |T| + s)`` summed over the spatial axes, with
    additive smoothing ``s``: an empty prediction on an empty target gives
    exactly 1, a perfect prediction gives 1, and an empty prediction on a
    non-empty target tends to 0 as the structure grows.

    Parameters
    ----------
    probs : torch.Tensor
        Probabilities in [0, 1], ``(N, C, *spatial)``.
    target : torch.Tensor
        Binary target of the same shape.
    smooth : float
        Additive smoothing s (> 0).
    """
    if probs.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(probs.shape)} vs {tuple(target.shape)}")
    if smooth <= 0:
        raise ValueError("smooth must be > 0 so that empty-on-empty is defined")
    dims = tuple(range(2, probs.ndim))
    t = target.to(probs.dtype)
    inter = (probs * t).sum(dims)
    denom = probs.sum(dims) + t.sum(dims)
    return (2.0 * inter + smooth) / (denom + smooth)


def dice_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard Dice per sample and channel ``(N, C)`` of boolean masks; empty vs empty = 1."""
    p = pred.bool()
    t = target.bool()
    dims = tuple(range(2, p.ndim))
    inter = (p & t).sum(dims).double()
    denom = p.sum(dims).double() + t.sum(dims).double()
    return torch.where(denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.ones_like(denom))


class SoftDiceLoss(nn.Module):
    """``1 - mean soft Dice`` over samples and channels (per-bone channels weighted equally).

    Parameters
    ----------
    from_logits : bool
        Apply a sigmoid to the input first (default; the U-Net returns logits).
    smooth : float
        Additive smoothing (1.0).
    channel_weights : sequence of float, optional
        Relative weight per channel (e.g. to up-weight the fibula).
    """

    def __init__(self, from_logits: bool = True, smooth: float = 1.0, channel_weights: Sequence[float] | None = None):
        super().__init__()
        self.from_logits = from_logits
        self.smooth = smooth
        w = torch.as_tensor(channel_weights, dtype=torch.float32) if channel_weights is not None else None
        self.register_buffer("channel_weights", w, persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss."""
        probs = torch.sigmoid(pred) if self.from_logits else pred
        d = soft_dice(probs, target, self.smooth)  # (N, C)
        if self.channel_weights is None:
            return 1.0 - d.mean()
        w = self.channel_weights.to(d)
        return 1.0 - (d * w).sum(dim=1).mean() / w.sum()


def class_weights(counts: Sequence[int], scheme: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """Class weights from class counts, normalised to mean 1.

    Parameters
    ----------
    counts : sequence of int
        Training examples per class (zeros are treated as 1).
    scheme : str
        'inverse' (1 / n_c) or 'effective' ((1 - beta) / (1 - beta**n_c), Cui et al. 2019).
    beta : float
        Effective-number parameter.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "effective":
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    else:
        raise ValueError(f"unknown scheme {scheme!r}; expected 'inverse' or 'effective'")
    return (w / w.mean()).float()


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha_y (1 - p_y)**gamma log p_y``, mean over the batch.

    ``gamma=0`` with ``alpha`` set is class-weighted cross-entropy (normalised
    by the batch size, not by the summed weights as ``nn.CrossEntropyLoss`` does).

    Parameters
    ----------
    gamma : float
        Focusing parameter (2).
    alpha : sequence of float, optional
        Per-class weights, e.g. from :func:`class_weights`.
    """

    def __init__(self, gamma: float = 2.0, alpha: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        a = torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None
        self.register_buffer("alpha", a, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits ``(N, K)`` and class indices ``(N,)``."""
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - logp.exp()) ** self.gamma) * logp
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss)[target]
        return loss.mean()


def expected_grade(logits: torch.Tensor) -> torch.Tensor:
    """Expected class index ``sum_k k p_k`` (0-based) per row of ``(N, K)`` logits."""
    p = torch.softmax(logits, dim=1)
    k = torch.arange(logits.shape[1], device=logits.device, dtype=p.dtype)
    return (p * k).sum(dim=1)


class OrdinalGradeLoss(nn.Module):
    """Ordinal-aware loss: (weighted) cross-entropy + ``l1_weight * |E[grade] - grade|``.

    The cross-entropy term learns calibrated class probabilities; the
    expected-grade term penalises distant errors more than neighbouring ones,
    which matches the quadratic-weighted kappa used for evaluation. Class
    indices are 0-based (grade 1 -> 0).

    Parameters
    ----------
    l1_weight : float
        Weight of the expected-grade L1 term (0 = plain cross-entropy).
    class_weight : sequence of float, optional
        Per-class weights for the cross-entropy term (rare grade 5).
    """

    def __init__(self, l1_weight: float = 0.5, class_weight: Sequence[float] | torch.Tensor | None = None) -> None:
        super().__init__()
        self.l1_weight = l1_weight
        w = torch.as_tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
        self.register_buffer("class_weight", w, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar loss for logits ``(N, K)`` and class indices ``(N,)``."""
        w = self.class_weight.to(logits) if self.class_weight is not None else None
        ce = F.cross_entropy(logits, target, weight=w)
        if self.l1_weight == 0:
            return ce
        l1 = (expected_grade(logits) - target.to(logits.dtype)).abs().mean()
        return ce + self.l1_weight * l1
