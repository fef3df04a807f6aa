"""The shipped HR-pQCT motion bundle (``models/hrpqct_motion/current``) grades fresh synthetic scans as issue 9 asks.

Test seeds 200-299 (sealed test protocol, models/README.md): 30 scans of seed 200 from the generator's defaults,
evaluated through the same code path as ``dicomnode-train evaluate`` with the bundle's own scan-grade cut points
and rescan operating point. Deterministic on CPU, so a failure means the bundle or the pipeline regressed, not bad
luck. Skipped when no bundle is committed.

Bounds: the issue's targets (QWK 0.80, rescan sensitivity 0.90) minus an allowance for 30 scans (QWK -0.10: its
standard error at n = 30 is about 0.05; sensitivity -0.24: one miss among the ~4 scans for a rescan;
specificity 0.60, a little below the 0.66-0.75 validation figures of the earlier bundles).

Expected to fail (strict) since issue 34 made the realistic soft tissue, anatomy, pose, dose and calibration the
generator's default: the shipped demo-20261203b was trained on the featureless scans and scores QWK 0.07,
rescan specificity 0.00 on the 200 seed-100 validation scans of the new generator (models/README.md,
2026-12-08). The warm-start retrain on the new scans did not finish (the disk filled during its first
validation). When a retrained bundle meets these bounds this test passes unexpectedly and fails: then set the
bounds from that bundle's validation figures minus the allowance above and remove the marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit._shipped import shipped_metrics
from training.synth import hrpqct_motion as synth

FRESH_SEED = 200
N_SCANS = 30


@pytest.mark.xfail(strict=True, reason="demo-20261203b predates the issue-34 generator (validation QWK 0.07); "
                                       "retrain pending, models/README.md 2026-12-08")
def test_shipped_hrpqct_bundle_grades_motion_and_recommends_rescans(tmp_path: Path) -> None:
    m = shipped_metrics("hrpqct_motion", synth, N_SCANS, FRESH_SEED, tmp_path, workers=2)
    assert m["n"] == N_SCANS
    assert sum(m["label_distribution"][3:]) >= 3  # scans labelled for a rescan are in the sample
    assert m["kappa_quadratic"] >= 0.70, m
    assert m["rescan_sensitivity"] >= 0.66, m
    assert m["rescan_specificity"] >= 0.60, m
