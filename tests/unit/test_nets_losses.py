"""Soft-Dice, focal/class-weighted and ordinal losses: values on constructed inputs."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from inference.nets.losses import (
    FocalLoss,
    OrdinalGradeLoss,
    SoftDiceLoss,
    class_weights,
    dice_score,
    expected_grade,
    soft_dice,
)


def _masks() -> torch.Tensor:
    t = torch.zeros(2, 3, 8, 8)
    t[0, 0, 2:6, 2:6] = 1
    t[1, 1, :4] = 1
    return t  # channel 2 empty in both samples, channel 0 empty in sample 1


def test_dice_loss_perfect_is_zero_and_empty_on_empty_scores_one() -> None:
    t = _masks()
    loss = SoftDiceLoss(from_logits=False)
    assert float(loss(t.clone(), t)) == pytest.approx(0.0, abs=1e-7)
    empty = torch.zeros(1, 3, 8, 8)
    assert float(loss(empty, empty)) == pytest.approx(0.0, abs=1e-7)
    assert torch.equal(soft_dice(empty, empty), torch.ones(1, 3))


def test_dice_loss_penalises_misses_per_channel() -> None:
    t = _masks()
    pred = t.clone()
    pred[0, 0] = 0  # miss the 16-pixel structure completely
    d = soft_dice(pred, t)
    assert float(d[0, 0]) == pytest.approx(1 / 17)
    assert torch.allclose(d[0, 1:], torch.ones(2)) and torch.allclose(d[1], torch.ones(3))
    assert float(SoftDiceLoss(from_logits=False)(pred, t)) == pytest.approx((1 - 1 / 17) / 6)
    wl = SoftDiceLoss(from_logits=False, channel_weights=[2.0, 1.0, 1.0])(pred, t)
    assert float(wl) == pytest.approx((2 * (1 - 1 / 17)) / 4 / 2)


def test_dice_loss_from_logits_and_gradients() -> None:
    t = _masks()
    logits = torch.where(t > 0, 20.0, -20.0).requires_grad_(True)
    loss = SoftDiceLoss()(logits, t)
    assert float(loss.detach()) < 1e-6
    bad = torch.zeros_like(t, requires_grad=True)
    lb = SoftDiceLoss()(bad, t)
    lb.backward()
    assert float(lb.detach()) > 0.3 and bad.grad is not None and float(bad.grad.abs().sum()) > 0


def test_soft_dice_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        soft_dice(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError):
        soft_dice(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), smooth=0)


def test_hard_dice_score() -> None:
    t = _masks().bool()
    assert torch.equal(dice_score(t, t), torch.ones(2, 3, dtype=torch.float64))
    p = t.clone()
    p[0, 0, 2:4] = False  # half of the 16 pixels
    assert float(dice_score(p, t)[0, 0]) == pytest.approx(2 * 8 / 24)
    assert float(dice_score(torch.zeros_like(t), t)[0, 0]) == 0.0


def test_class_weights() -> None:
    w = class_weights([334, 97, 42, 24, 2])
    assert w.shape == (5,) and float(w.mean()) == pytest.approx(1.0)
    assert torch.all(w[1:] > w[:-1])
    e = class_weights([100, 10], scheme="effective", beta=0.9)
    assert float(e[1]) > float(e[0])
    with pytest.raises(ValueError):
        class_weights([1, 2], scheme="sqrt")


def test_focal_loss_reduces_to_ce_and_down_weights_easy_examples() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(float(F.cross_entropy(logits, target)))
    alpha = torch.tensor([1.0, 2.0, 1.0, 1.0, 3.0])
    expected = (F.cross_entropy(logits, target, reduction="none") * alpha[target]).mean()
    assert float(FocalLoss(gamma=0.0, alpha=alpha)(logits, target)) == pytest.approx(float(expected))
    easy = torch.tensor([[8.0, 0, 0, 0, 0]])
    assert float(FocalLoss(gamma=2.0)(easy, torch.tensor([0]))) < 1e-3 * float(F.cross_entropy(easy, torch.tensor([0])))


def test_ordinal_loss_penalises_distant_grades_more() -> None:
    target = torch.tensor([0])
    near = torch.tensor([[0.0, 5.0, 0.0, 0.0, 0.0]])  # predicts grade 2 for a grade-1 scan
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0]])  # predicts grade 5
    ce = F.cross_entropy
    assert float(ce(near, target)) == pytest.approx(float(ce(far, target)))
    loss = OrdinalGradeLoss(l1_weight=1.0)
    assert float(loss(far, target)) > float(loss(near, target)) + 2.0
    assert float(expected_grade(far)) == pytest.approx(
        float((torch.softmax(far, 1) * torch.arange(5.0)).sum())
    )
    assert float(OrdinalGradeLoss(l1_weight=0.0)(far, target)) == pytest.approx(float(ce(far, target)))
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])
    x = torch.randn(4, 5, requires_grad=True)
    y = torch.tensor([4, 0, 2, 3])
    out = OrdinalGradeLoss(class_weight=w)(x, y)
    out.backward()
    assert x.grad is not None
