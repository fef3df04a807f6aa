"""The shipped knee demo bundle (``models/knee_bone_seg/current``) segments fresh synthetic volumes of the issue-34
generator.

Test seeds 200-299 (models/README.md, "Sealed test protocol"): never used for training (seed 1), choices (seed 100)
or the sealed set (9010-9019). Evaluated through the same code path as ``dicomnode-train evaluate`` (node pre/post-
processing, inverse mapping to the source grid); deterministic on CPU. Skipped when no bundle is committed.

Bounds: the bundle's validation figures (demo-20261208k on 12 volumes of seed 100: Dice femur 0.949, tibia 0.960,
fibula 0.880, no bone missed) minus an allowance for 4 volumes instead of 12: 0.05 for femur and tibia, 0.12 for
the small fibula (whose Dice varies most between volumes), and at most one volume with a missed fibula. They were
set before this test was first run, not from its score.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit._shipped import shipped_metrics
from training.synth import knee_bone_seg as synth

TEST_SEED = 200
N_VOLUMES = 4


def test_shipped_knee_bundle_segments_all_three_bones(tmp_path: Path) -> None:
    m = shipped_metrics("knee_bone_seg", synth, N_VOLUMES, TEST_SEED, tmp_path)
    assert m["n_volumes"] == N_VOLUMES
    assert m["dice_femur"] >= 0.949 - 0.05 and m["dice_tibia"] >= 0.960 - 0.05, m
    assert m["dice_fibula"] >= 0.880 - 0.12, m  # the bone the thesis's softmax network missed
    assert m["hd95_femur_missed"] == 0 and m["hd95_tibia_missed"] == 0 and m["hd95_fibula_missed"] <= 1, m
