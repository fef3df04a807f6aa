"""Per-volume scoring of ``knee_bone_seg`` for :mod:`training.validate`.

The task's own evaluation (:meth:`training.tasks.knee_bone_seg.KneeAdapter.evaluate`:
post-processing as the node does, masks back on the source grid, Dice per bone)
averages over the volumes it is given, so it is run on one volume at a time: its
figures are then that volume's Dice per bone. A volume that fails is listed with
its reason and the others are still scored. The subgroup tables give the mean
Dice per bone of each subgroup; a segmentation has no decision threshold to sweep.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.adapter import TaskConfig
from training.data import Record, SampleCache

__all__ = ["DICE_KEYS", "score_knee", "seg_subgroup_table"]

BONES = ("femur", "tibia", "fibula")
DICE_KEYS = (*(f"dice_{b}" for b in BONES), "dice_mean")


def score_knee(adapter: Any, model: torch.nn.Module, records: list[Record], tcfg: TaskConfig, b: Any,
               device: torch.device, failures: list[Any]
               ) -> tuple[list[Record], dict[str, Any], list[dict[str, Any]]]:
    """(scored records, the task's figures over them, one row of figures per scored volume)."""
    from training.trainer import evaluate_records
    from training.validate import Failure, _train_config, preprocess_each

    scored: list[Record] = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="validate-cache-") as tmp:
        cache = SampleCache(tmp)
        good = preprocess_each(adapter, records, tcfg, cache, failures)
        cfg = _train_config(b, device)
        for r in good:
            try:
                m = evaluate_records(adapter, model, [r], tcfg, cfg, device, cache).metrics
            except Exception as exc:  # noqa: BLE001 - one bad volume is listed, the others are scored
                failures.append(Failure(r.key, f"{type(exc).__name__}: {exc}", "inference"))
                continue
            scored.append(r)
            rows.append({"study": r.key, **{k: float(v) for k, v in m.items()
                                           if isinstance(v, int | float) and k != "n_volumes"}})
    return scored, _pooled(rows), rows


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else math.nan


def _pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The task's figures over all volumes (mean of the finite per-volume values, as the task averages them)."""
    out: dict[str, Any] = {"n_volumes": len(rows)}
    if rows:
        for key in rows[0]:
            if key.endswith("_missed"):  # volumes in which a bone was not found at all: a count
                out[key] = int(sum(r.get(key, 0) for r in rows))
            elif key != "study":
                out[key] = _mean([r.get(key, math.nan) for r in rows])
        out["dice_mean"] = float(np.mean([out.get(f"dice_{b}", math.nan) for b in BONES]))
    return out


def seg_subgroup_table(rows: list[dict[str, Any]], groups: Sequence[str],
                       patients: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean Dice per bone (and their mean) per subgroup value, with the number of volumes and patients."""
    g = np.asarray(groups, dtype=object)
    table: dict[str, dict[str, Any]] = {}
    for value in sorted(set(g.tolist()), key=str):
        idx = np.nonzero(g == value)[0]
        row: dict[str, Any] = {"n": int(len(idx)), "patients": len({patients[int(i)] for i in idx})}
        for k in DICE_KEYS:
            row[k] = _mean([rows[int(i)][k] for i in idx])
        table[str(value)] = row
    return table
