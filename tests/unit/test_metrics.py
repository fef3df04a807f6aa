"""Metrics checked against sklearn or hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training import metrics as m


@pytest.fixture
def binary() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.25, 200), 0, 1)
    s[:20] = np.round(s[:20], 1)  # ties
    return y, s


def test_binary_against_sklearn(binary) -> None:
    y, s = binary
    pred = (s >= 0.5).astype(int)
    assert m.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert m.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    fpr, tpr, _ = m.roc_curve(y, s)
    assert m.roc_auc(y, s) == pytest.approx(np.trapezoid(tpr, fpr))
    sens, spec = m.sensitivity_specificity(y, pred)
    assert sens == pytest.approx(skm.recall_score(y, pred))
    assert spec == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert np.array_equal(m.confusion_matrix(y, pred, 2), skm.confusion_matrix(y, pred))
    rep = m.classification_report(y, s, ["no", "yes"], n_boot=200)
    lo, hi = rep["auc_ci95"]
    assert lo < rep["auc"] < hi and hi - lo < 0.3
    assert rep["f1"] == pytest.approx(skm.f1_score(y, pred))


def test_multiclass_against_sklearn() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 150)
    pred = np.where(rng.random(150) < 0.6, y, rng.integers(0, 4, 150))
    assert m.macro_f1(y, pred, 4) == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m.cohen_kappa(y, pred) == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m.cohen_kappa(y, pred, "quadratic") == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m.cohen_kappa(y, pred, "linear") == pytest.approx(skm.cohen_kappa_score(y, pred, weights="linear"))
    prob = np.eye(4)[pred] * 0.7 + 0.075
    rep = m.classification_report(y, prob, ["a", "b", "c", "d"])
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_degenerate_cases() -> None:
    assert math.isnan(m.roc_auc([1, 1], [0.2, 0.3]))
    assert math.isnan(m.sensitivity_specificity([0, 0], [0, 1])[0])
    assert m.dice(np.zeros(4), np.zeros(4)) == 1.0
    assert m.hd95(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0
    assert m.hd95(np.ones((3, 3)), np.zeros((3, 3))) == math.inf


def test_average_precision_by_hand() -> None:
    gts = {"a": np.array([[0, 0, 10, 10]]), "b": np.array([[0, 0, 10, 10], [20, 20, 30, 30]])}
    preds = [
        m.BoxPrediction("a", (0, 0, 10, 10), 0, 0.9),    # TP
        m.BoxPrediction("b", (50, 50, 60, 60), 0, 0.8),  # FP
        m.BoxPrediction("b", (0, 0, 10, 11), 0, 0.7),    # TP (IoU 0.91)
        m.BoxPrediction("a", (0, 0, 10, 10), 0, 0.6),    # duplicate -> FP
    ]
    # precision/recall: (1, 1/3), (1/2, 1/3), (2/3, 2/3), (1/2, 2/3); all-point AP = 1/3*1 + 1/3*2/3
    assert m.average_precision(preds, gts) == pytest.approx(1 / 3 + 2 / 9)
    res = m.mean_average_precision(preds, {k: [(tuple(b), 0) for b in v] for k, v in gts.items()})
    assert res["map"] == pytest.approx(1 / 3 + 2 / 9)
    fr = m.froc(preds, gts, n_images=2, fps_per_image=(0.5, 1.0))
    # order TP, FP, TP, FP: FP/image 0, .5, .5, 1 with sensitivity 1/3, 1/3, 2/3, 2/3
    assert fr["sensitivity"] == pytest.approx([2 / 3, 2 / 3])
    assert m.box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]]))[0, 0] == pytest.approx(1 / 7)


def test_dice_and_hd95_by_hand() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b[2:6, 4:8] = True
    assert m.dice(a, b) == pytest.approx(2 * 8 / 32)
    assert m.hd95(a, a) == 0.0
    shifted = np.roll(a, 3, axis=1)
    assert m.hd95(a, shifted) == pytest.approx(3.0)
    assert m.hd95(a, shifted, spacing=(1.0, 0.5)) == pytest.approx(1.5)
    lab_p = np.zeros((10, 10), int)
    lab_t = np.zeros((10, 10), int)
    lab_p[a] = 1
    lab_t[b] = 1
    lab_t[8:, 8:] = 2
    rep = m.segmentation_report(lab_p, lab_t, ["femur", "tibia"])
    assert rep["femur"]["dice"] == pytest.approx(0.5) and rep["tibia"]["dice"] == 0.0
    stacked = m.segmentation_report(np.stack([a, b]), np.stack([a, a]), ["x", "y"], channels_first=True)
    assert stacked["x"]["dice"] == 1.0 and stacked["y"]["dice"] == pytest.approx(0.5)


def test_aggregate_by_group() -> None:
    scores = np.array([0.1, 0.7, 0.2, 0.4, 0.6, 0.9])
    groups = [5, 5, 2, 2, 9, 9]
    ids, alo = m.aggregate_by_group(scores, groups, "max")
    assert ids.tolist() == [2, 5, 9] and alo.tolist() == [0.4, 0.7, 0.9]
    _, vote = m.aggregate_by_group(scores, groups, "majority")
    assert vote.tolist() == [0.0, 0.5, 1.0]
    _, mean = m.aggregate_by_group(np.array([[0.2, 0.8], [0.4, 0.6]]), [1, 1], "mean")
    assert mean.tolist() == [[pytest.approx(0.3), pytest.approx(0.7)]]
    with pytest.raises(ValueError):
        m.aggregate_by_group(scores, groups, "median")


# Values computed by the hand-written implementation these functions replaced (before scikit-learn); the figures
# in models/README.md come from these functions, so a change here would change them.
_Y = [0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 1, 0]
_S = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.6, 0.3, 0.05, 0.7, 0.6]
_YK = [0, 1, 2, 2, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1]
_PK = [0, 1, 1, 2, 2, 0, 2, 0, 1, 0, 1, 2, 1, 1]


def test_binary_figures_pinned_to_previous_implementation() -> None:
    assert m.roc_auc(_Y, _S) == pytest.approx(0.8055555555555556, abs=1e-12)
    fpr, tpr, thr = m.roc_curve(_Y, _S)
    assert fpr == pytest.approx([0, 0, 0, 0, 1 / 3, 0.5, 0.5, 0.5, 2 / 3, 5 / 6, 1])
    assert tpr == pytest.approx([0, 1 / 6, 1 / 3, 0.5, 2 / 3, 2 / 3, 5 / 6, 1, 1, 1, 1])
    assert thr[0] == math.inf and thr[1:] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.4, 0.35, 0.3, 0.2, 0.1, 0.05])
    rep = m.classification_report(_Y, _S, ["no", "yes"], n_boot=50)
    assert rep["auc_ci95"] == pytest.approx([0.50625, 0.9857142857142858], abs=1e-12)
    assert (rep["sensitivity"], rep["specificity"], rep["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert rep["confusion_matrix"] == [[4, 2], [2, 4]]


def test_multiclass_figures_pinned_to_previous_implementation() -> None:
    assert m.confusion_matrix(_YK, _PK, 3).tolist() == [[3, 1, 0], [1, 3, 1], [0, 2, 3]]
    assert m.confusion_matrix(_YK, _PK, 4).shape == (4, 4)
    assert m.macro_f1(_YK, _PK, 3) == pytest.approx(0.654040404040404, abs=1e-12)
    assert m.macro_f1(_YK, _PK, 4) == pytest.approx(0.654040404040404, abs=1e-12)  # absent class 3 does not count
    assert m.cohen_kappa(_YK, _PK, None, 3) == pytest.approx(0.46153846153846145, abs=1e-12)
    assert m.cohen_kappa(_YK, _PK, "quadratic", 3) == pytest.approx(0.7058823529411764, abs=1e-12)
    assert m.cohen_kappa(_YK, _PK, "quadratic", 4) == pytest.approx(0.7058823529411764, abs=1e-12)
    assert m.cohen_kappa(_YK, _PK, "linear", 3) == pytest.approx(0.5783132530120483, abs=1e-12)
    rep = m.classification_report(_YK, np.eye(3)[_PK] * 0.6 + 0.1, ["a", "b", "c"])
    assert rep["sensitivity_per_class"] == pytest.approx({"a": 0.75, "b": 0.6, "c": 0.6})
    assert rep["auc_ovr"] == pytest.approx({"a": 0.825, "b": 0.6333333333333333, "c": 0.7444444444444445}, abs=1e-12)
    assert math.isnan(m.cohen_kappa([1, 1], [1, 1])) and math.isnan(m.macro_f1([], []))
    with pytest.raises(ValueError, match="unknown weights"):
        m.cohen_kappa(_YK, _PK, "cubic")
