"""The shipped physis_fracture bundle on fresh synthetic paediatric studies (issue 7: the demo bundle finds
growth-plate fractures, and the two-stage method beats the whole-image classifier, as in the thesis; issue 34: the
generator's default realism with per-view visibility labels, test seeds 200-299)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shipped import shipped_bundle
from training.evaluate import evaluate_bundle
from training.synth import physis_fracture

SHIPPED = shipped_bundle("physis_fracture")
# Bounds from the shipped bundle's validation figures (models/README.md, "wrist_fracture and physis_fracture on the
# issue-34 generator"): on 60 validation studies (seed 101, 114 images) demo-20261206p scores two-stage image AUC
# 0.623, whole-image classifier 0.559, two-stage accuracy 0.614 (at its threshold 0.814). Allowance for 40 test studies (~75 images, ~25 positive; the AUC's
# standard error is about 0.06): 0.12 on the AUC and on the margin, 0.10 on the accuracy. Never set from this
# test's own score. The bundle is far below the 0.85 target on the new generator, and its margin over the
# classifier (0.06 on validation) is within the allowance, so the margin bound is negative: these guard what it does
# reach, no more.
VAL_AUC, VAL_CLS, VAL_ACC = 0.623, 0.559, 0.614
MIN_AUC, MIN_MARGIN, MIN_ACCURACY = VAL_AUC - 0.12, (VAL_AUC - VAL_CLS) - 0.12, VAL_ACC - 0.10


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped physis_fracture bundle")
# Known failure (2026-12-08): demo-20261206p predates the issue-34 generator; its two-stage accuracy here is 0.50,
# below MIN_ACCURACY (its AUC and margin pass); it needs retraining (models/README.md). strict: a bundle that passes
# must drop this mark.
@pytest.mark.xfail(strict=True, reason="shipped physis bundle predates the issue-34 generator (accuracy 0.50 < 0.514)")
def test_shipped_physis_two_stage_finds_fractures_and_beats_the_whole_image_classifier(tmp_path: Path) -> None:
    # a test seed (200-299), unlike the training (1), validation (100-199) and sealed (9010-9019) sets
    physis_fracture.generate(tmp_path / "test", 40, 202, workers=2)
    m = evaluate_bundle(SHIPPED, tmp_path / "test", subset="all", device="cpu").result.metrics
    assert m["method"] == "two_stage" and m["n_images"] >= 70
    assert m["two_stage_auc"] >= MIN_AUC, m["two_stage_auc"]
    assert m["two_stage_auc"] - m["classifier_auc"] >= MIN_MARGIN, (m["two_stage_auc"], m["classifier_auc"])
    assert m["two_stage_accuracy"] >= MIN_ACCURACY, m["two_stage_accuracy"]
