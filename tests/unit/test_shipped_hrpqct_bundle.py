"""The shipped HR-pQCT motion bundle (``models/hrpqct_motion/current``) grades fresh synthetic scans as issue 9 asks.

Fresh seed (the recipe uses seeds 1 and 2; models/README.md reports seeds 2 and 3), both scanner geometries,
evaluated through the same code path as ``dicomnode-train evaluate`` with the bundle's own scan-grade cut points
and rescan operating point. Deterministic on CPU, so a failure means the bundle or the pipeline regressed, not bad
luck. 30 scans (about 50 s) give a noisier kappa than models/README.md's 100-200 (0.83-0.84); the bounds sit a
little below this sample's measured figures. Skipped when no bundle is committed.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit._shipped import shipped_metrics
from training.synth import hrpqct_motion as synth

FRESH_SEED = 11
N_SCANS = 30


def test_shipped_hrpqct_bundle_grades_motion_and_recommends_rescans(tmp_path: Path) -> None:
    m = shipped_metrics("hrpqct_motion", synth, N_SCANS, FRESH_SEED, tmp_path, workers=2)
    assert m["n"] == N_SCANS
    assert sum(m["label_distribution"][3:]) >= 3  # scans labelled for a rescan are in the sample
    assert m["kappa_quadratic"] >= 0.70, m  # measured 0.750 on this sample (ceiling: generating grade 0.91)
    assert m["rescan_sensitivity"] >= 0.9, m  # measured 1.0 (3 of 3), specificity 0.81
    assert m["rescan_specificity"] >= 0.7, m
