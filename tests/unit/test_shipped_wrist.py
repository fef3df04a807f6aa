"""The shipped wrist_fracture bundle against the histogram baseline on the same fresh synthetic studies (issue 4:
a simple non-deep baseline must stay well below the CNN; issue 6: the demo bundle detects fractures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shipped import shipped_bundle
from training import baseline
from training.evaluate import evaluate_bundle
from training.synth import wrist_fracture

SHIPPED = shipped_bundle("wrist_fracture")


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped wrist_fracture bundle")
def test_shipped_wrist_model_is_far_above_the_histogram_baseline_on_the_same_studies(tmp_path: Path) -> None:
    # seeds and sizes unlike the bundle's training (seed 1) and hold-out (seed 2) sets; the recipe's difficulty 0.2
    wrist_fracture.generate(tmp_path / "fit", 120, 11, workers=2, difficulty=0.2)
    wrist_fracture.generate(tmp_path / "test", 60, 12, workers=2, difficulty=0.2)
    base = baseline.run_baseline("wrist_fracture", tmp_path / "test", fit_root=tmp_path / "fit")
    ev = evaluate_bundle(SHIPPED, tmp_path / "test", subset="all", device="cpu")
    cnn = ev.result.metrics["study_auc"]
    assert base["n"] == ev.result.metrics["n_studies"] == 60
    assert base["auc"] < 0.7, base  # histograms do not see a fracture line
    assert cnn >= 0.85 and cnn - base["auc"] >= 0.25, (cnn, base["auc"])
