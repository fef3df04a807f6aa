"""The shipped wrist_fracture bundle against the histogram baseline on the same fresh synthetic studies (issue 4:
a simple non-deep baseline must stay well below the CNN; issue 6: the demo bundle detects fractures; issue 34: the
generator's default realism, test seeds 200-299)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shipped import shipped_bundle
from training import baseline
from training.evaluate import evaluate_bundle
from training.synth import wrist_fracture

SHIPPED = shipped_bundle("wrist_fracture")
# Bounds from the shipped bundle's validation figures (models/README.md, "wrist_fracture and physis_fracture on the
# issue-34 generator"): demo-20261203w scores study AUC 0.820 on 200 validation studies (seed 100, default
# difficulty), where the histogram baseline fitted on the 600 training studies (seed 1) scores 0.483. Allowance for 60 test studies (~19 positives; the AUC's standard
# error is about 0.05): 0.10 on the AUC, 0.15 on the margin. Never set from this test's own score.
VAL_AUC, VAL_BASE = 0.820, 0.483
MIN_AUC, MIN_MARGIN, MAX_BASELINE = VAL_AUC - 0.10, (VAL_AUC - VAL_BASE) - 0.15, 0.70


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped wrist_fracture bundle")
# Known failure (2026-12-08): demo-20261203w predates the issue-34 generator and scores study AUC 0.651 here (baseline
# 0.528), below MIN_AUC; it needs retraining (models/README.md). strict: a bundle that passes must drop this mark.
@pytest.mark.xfail(strict=True, reason="shipped wrist bundle predates the issue-34 generator (AUC 0.65 < 0.72 here)")
def test_shipped_wrist_model_is_far_above_the_histogram_baseline_on_the_same_studies(tmp_path: Path) -> None:
    # test seeds (200-299), unlike the training (1), validation (100-199) and sealed (9010-9019) sets
    wrist_fracture.generate(tmp_path / "fit", 120, 200, workers=2)
    wrist_fracture.generate(tmp_path / "test", 60, 201, workers=2)
    base = baseline.run_baseline("wrist_fracture", tmp_path / "test", fit_root=tmp_path / "fit")
    ev = evaluate_bundle(SHIPPED, tmp_path / "test", subset="all", device="cpu")
    cnn = ev.result.metrics["study_auc"]
    assert base["n"] == ev.result.metrics["n_studies"] == 60
    assert base["auc"] < MAX_BASELINE, base  # histograms do not see a fracture line
    assert cnn >= MIN_AUC and cnn - base["auc"] >= MIN_MARGIN, (cnn, base["auc"])
