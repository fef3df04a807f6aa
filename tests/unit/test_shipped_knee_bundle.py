"""The shipped knee demo bundle (``models/knee_bone_seg/current``) meets issue 10's figures on fresh synthetic volumes.

Fresh seed (never used by the training recipe, which uses seeds 1 and 2), evaluated through the same code path as
``dicomnode-train evaluate`` (node pre/post-processing, inverse mapping to the source grid). Deterministic on CPU,
so a failure means the bundle or the pipeline regressed, not bad luck. Skipped when no bundle is committed.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit._shipped import shipped_metrics
from training.synth import knee_bone_seg as synth

FRESH_SEED = 11
N_VOLUMES = 4


def test_shipped_knee_bundle_segments_all_three_bones(tmp_path: Path) -> None:
    m = shipped_metrics("knee_bone_seg", synth, N_VOLUMES, FRESH_SEED, tmp_path)
    assert m["n_volumes"] == N_VOLUMES
    assert m["dice_femur"] >= 0.95 and m["dice_tibia"] >= 0.95, m
    assert m["dice_fibula"] >= 0.85, m  # the bone the thesis's softmax network missed
    assert m["hd95_fibula_missed"] == 0
