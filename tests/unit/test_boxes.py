"""inference.boxes (torchvision.ops) against the hand-written IoU/NMS it replaced, on random boxes with ties."""

from __future__ import annotations

import numpy as np
import pytest

from inference.boxes import box_iou, nms


def _ref_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The numpy IoU that inference/tasks/physis_fracture_post.py had before torchvision."""
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _ref_nms(b: np.ndarray, s: np.ndarray, thr: float) -> list[int]:
    order = list(np.lexsort((np.arange(len(s)), -s)))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if order:
            ov = _ref_iou(b[[i]], b[order])[0]
            order = [j for j, o in zip(order, ov, strict=True) if o <= thr]
    return keep


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.integers(0, 40, (n, 2)).astype(float)
    wh = rng.integers(0, 25, (n, 2)).astype(float)  # zero-width boxes included
    return np.c_[xy, xy + wh]


@pytest.mark.parametrize("seed", range(5))
def test_iou_and_nms_equal_previous_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = _random_boxes(rng, 60)
    s = rng.integers(0, 6, 60) / 5.0  # many equal scores
    np.testing.assert_array_equal(box_iou(b, b[:17]), _ref_iou(b, b[:17]))
    for thr in (0.1, 0.3, 0.5, 0.7):
        assert nms(b, s, thr).tolist() == _ref_nms(b, s, thr)


def test_empty_and_inverted_boxes_have_zero_iou() -> None:
    assert box_iou([[5, 5, 5, 5]], [[5, 5, 5, 5]]).tolist() == [[0.0]]
    assert box_iou([[10, 10, 0, 0]], [[0, 0, 10, 10]]).tolist() == [[0.0]]
    assert box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0, 0] == pytest.approx(1 / 7)
    assert nms(np.zeros((0, 4)), [], 0.5).tolist() == []
    assert nms([[0, 0, 10, 10], [0, 0, 10, 10]], [0.5, 0.5], 0.5).tolist() == [0]
    with pytest.raises(ValueError, match="2 boxes but 1 scores"):
        nms([[0, 0, 1, 1], [0, 0, 1, 1]], [0.5], 0.5)
