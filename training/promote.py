"""``dicomnode-train promote``: promote a bundle only if it beats the current version on the locked hold-out.

Both bundles are evaluated on the same records: the hold-out split of ``--data``
under the candidate's split config, which must match the hold-out hash recorded
in the candidate. Without ``--data`` the metrics stored in the two bundles are
compared, which is only allowed when both recorded the same hold-out hash.
Exit status: 0 promoted, 1 kept the current version, 2 error.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from inference.bundle import BundleMeta, read_meta
from inference.errors import DicomNodeError
from inference.registry import ModelRegistry
from training.trainer import TrainError

log = logging.getLogger(__name__)

__all__ = ["Decision", "add_arguments", "promote_if_better", "run"]

#: task-config fields that define the truth an evaluation scores against, not the network
LABELLING_FIELDS = ("image_labels",)


@dataclass
class Decision:
    """Outcome of a promotion attempt."""

    promoted: bool
    reason: str
    metric: str | None
    candidate: float | None
    current: float | None
    version: str


def _better(cand: float, cur: float, greater: bool, margin: float) -> bool:
    if math.isnan(cand):
        return False
    if math.isnan(cur):
        return True
    return cand > cur + margin if greater else cand < cur - margin


def promote_if_better(
    bundle_dir: str | os.PathLike[str],
    registry_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    margin: float = 0.0,
    device: str = "auto",
    force: bool = False,
    records: list | None = None,
) -> Decision:
    """Compare the candidate with the registry's current version and promote it if better by ``margin``.

    Raises
    ------
    TrainError
        If the two cannot be compared fairly (different hold-out sets, no primary metric).
    """
    from training.evaluate import evaluate_bundle

    cand_meta = read_meta(bundle_dir)
    registry = ModelRegistry(registry_dir)
    task, metric = cand_meta.task, cand_meta.primary_metric
    current_version = registry.current(task)
    if force or current_version is None:
        registry.promote(task, bundle_dir)
        why = "forced" if force else "no current version"
        return Decision(True, why, metric, None, None, cand_meta.version)
    if current_version == cand_meta.version:
        return Decision(False, "candidate is already the current version", metric, None, None, cand_meta.version)
    cur_dir = registry.current_dir(task)
    cur_meta: BundleMeta = read_meta(cur_dir)
    if not metric:
        raise TrainError("candidate bundle has no primary metric")
    if cur_meta.primary_metric not in (None, metric):
        log.warning("current version used primary metric %s; comparing on %s", cur_meta.primary_metric, metric)
    if data_dir is not None or records is not None:
        cand_ev = evaluate_bundle(bundle_dir, data_dir, records=records, device=device)
        if cand_ev.holdout_matches is False:
            raise TrainError("the hold-out split of this data does not match the candidate's recorded hold-out hash")
        # the current bundle is scored on exactly the same records (the candidate's hold-out)
        chosen = _holdout_records(cand_meta, data_dir, records)
        # with the candidate's labelling (e.g. study labels where the site has no boxes): the same truth for both
        same_truth = {k: cand_meta.task_config[k] for k in LABELLING_FIELDS
                      if k in cand_meta.task_config and k in cur_meta.task_config}
        cur_ev = evaluate_bundle(cur_dir, records=chosen, subset="all", device=device, task_overrides=same_truth)
        c, k = cand_ev.result.metrics.get(metric, math.nan), cur_ev.result.metrics.get(metric, math.nan)
    else:
        if cand_meta.holdout_hash is None or cand_meta.holdout_hash != cur_meta.holdout_hash:
            raise TrainError("bundles were scored on different hold-out sets; pass --data to re-evaluate both")
        c, k = cand_meta.metrics.get(metric, math.nan), cur_meta.metrics.get(metric, math.nan)
    c, k = float(c), float(k)
    if _better(c, k, cand_meta.greater_is_better, margin):
        registry.promote(task, bundle_dir)
        return Decision(True, f"{metric} {c:.4g} beats {k:.4g} by more than {margin}", metric, c, k, cand_meta.version)
    return Decision(False, f"{metric} {c:.4g} does not beat current {k:.4g} by {margin}", metric, c, k,
                    cand_meta.version)


def _holdout_records(meta: BundleMeta, data_dir: str | os.PathLike[str] | None, records: list | None) -> list:
    from training.data import load_records, split_records
    from training.evaluate import split_config_of

    recs = records if records is not None else load_records(Path(data_dir))  # type: ignore[arg-type]
    return split_records(recs, split_config_of(meta)).holdout


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dicomnode-train promote``."""
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    p.add_argument("--registry", required=True, help="models directory (the node's models_dir)")
    p.add_argument("--data", help="labelled data folder; both bundles are re-evaluated on its locked hold-out")
    p.add_argument("--margin", type=float, default=0.0, help="required improvement of the primary metric")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--force", action="store_true", help="promote without comparing")


def run(args: argparse.Namespace) -> int:
    """Run ``promote``; exit 0 if promoted, 1 if the current version stays."""
    try:
        d = promote_if_better(args.bundle, args.registry, data_dir=args.data, margin=args.margin, device=args.device,
                              force=args.force)
    except DicomNodeError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{'promoted' if d.promoted else 'not promoted'}: {d.version} ({d.reason})")
    return 0 if d.promoted else 1
