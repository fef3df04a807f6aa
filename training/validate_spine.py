"""Per-study scoring of ``spine_bmd`` for :mod:`training.validate`.

Each study goes through the node's own pipeline (level finder, detector on the
mid-body slices, class rule with the bundle's offsets) via
:meth:`training.tasks.spine_bmd.SpineBmdAdapter.study_evaluation`, one study at a
time, so that a study that fails (unreadable series, no level found) is listed
with its reason and the others are still scored. The unit is the vertebra
(L1-L4 with a class in the manifest); it needs no boxes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from inference.tasks.spine_bmd_levels import CLASS_NAMES, decide_class
from training.adapter import TaskConfig
from training.data import Record
from training.validate_stats import Scores

__all__ = ["score_spine"]


def score_spine(adapter: Any, model: torch.nn.Module, records: list[Record], tcfg: TaskConfig,
                device: torch.device, failures: list[Any]) -> tuple[Scores | None, list[Record], dict[str, Any]]:
    """Vertebra-level scores of every study that the pipeline could read; failures appended as they come."""
    from training.validate import Failure

    offsets = getattr(tcfg, "class_log_offsets", None)
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    rec_idx: list[np.ndarray] = []
    scored: list[Record] = []
    missed_total = 0
    for r in records:
        try:
            with torch.inference_mode():
                res = adapter.study_evaluation(model, [r], device, tcfg)
        except Exception as exc:  # noqa: BLE001 - one bad study is listed, the others are scored
            failures.append(Failure(r.key, f"{type(exc).__name__}: {exc}", "image"))
            continue
        missed = int(res["metrics"].get("vertebrae_missed", 0))
        y = np.asarray(res["y_true"], dtype=int)
        if missed:
            missed_total += missed
            failures.append(Failure(r.key, f"{missed} labelled level(s) of L1-L4 not found by the level finder or "
                                           "the detector (not scored)", "inference"))
        if not y.size:
            continue
        rec_idx.append(np.full(y.size, len(scored)))
        scored.append(r)
        ys.append(y)
        ps.append(np.asarray(res["y_prob"], dtype=float).reshape(-1, len(CLASS_NAMES)))
    if not scored:
        return None, [], {}
    y, p, rec = np.concatenate(ys), np.concatenate(ps), np.concatenate(rec_idx)
    pred = np.asarray([decide_class(row, offsets) for row in p], dtype=int)
    scores = Scores(unit="vertebra", class_names=list(CLASS_NAMES), y_true=y, prob=p, pred=pred, record=rec,
                    patient=np.asarray([scored[int(i)].patient_id for i in rec]))
    return scores, scored, {"vertebrae_evaluated": int(y.size), "vertebrae_missed": missed_total,
                            "studies": len(scored)}
