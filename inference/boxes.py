"""Box IoU and non-maximum suppression on numpy arrays, computed by :mod:`torchvision.ops`.

Boxes are (N, 4) in (x0, y0, x1, y1). These wrappers fix the conventions the tasks rely on and torchvision leaves
open: an inverted box (x1 < x0) counts as empty, the IoU of two empty boxes is 0 (torchvision gives NaN), and NMS
keeps equal scores in index order (torchvision's sort is not stable).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["box_iou", "nms"]


def _as_boxes(boxes: Any) -> np.ndarray:
    b = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    b[:, 2] = np.maximum(b[:, 2], b[:, 0])
    b[:, 3] = np.maximum(b[:, 3], b[:, 1])
    return b


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU (N, M) of boxes ``a`` (N, 4) and ``b`` (M, 4); 0 where the union is empty."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    out = tv_box_iou(torch.from_numpy(_as_boxes(a)), torch.from_numpy(_as_boxes(b))).numpy()
    return np.nan_to_num(out, nan=0.0)


def nms(boxes: Any, scores: Any, iou_thr: float) -> np.ndarray:
    """Greedy NMS: indices kept, by descending score (ties: lower index first); a box goes when IoU > ``iou_thr``."""
    import torch
    from torchvision.ops import nms as tv_nms

    b = _as_boxes(boxes)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) != len(b):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    order = np.lexsort((np.arange(len(s)), -s))
    rank = torch.arange(len(s), 0, -1, dtype=torch.float64)  # strictly decreasing: the stable order is kept
    keep = tv_nms(torch.from_numpy(b[order]), rank, float(iou_thr)).numpy()
    return order[keep].astype(np.int64)
