"""Histogram baseline: it detects histogram-level signal, and it does not solve the synthetic tasks.

The bounds are the issue's requirement that a non-deep baseline stays well below the
CNN: the CNN targets are image AUC >= 0.85 (physis), QWK >= 0.80 (HR-pQCT motion) and
vertebra macro-F1 >= 0.75 (spine BMD). The wrist check lives in test_synth_radiograph.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training import baseline
from training.cli import main as train_main


def test_detects_a_histogram_signal_and_groups_by_patient() -> None:
    """Not a vacuous check: a class-dependent histogram shift is found, and folds never split a patient."""
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 2
    groups = np.repeat(np.arange(n // 2), 2).astype(str)  # two units per patient, like a PA + lateral study
    x = rng.dirichlet(np.ones(16), size=n)
    x[:, 3] += 0.15 * y  # more of one grey level in the positive class
    prob = baseline.cross_validated_probabilities(x, y, groups, folds=5)
    from training import metrics

    assert metrics.roc_auc(y, prob[:, 1]) > 0.9
    assert np.allclose(prob.sum(axis=1), 1.0)
    # labels that are pure noise stay at chance
    noise = rng.permutation(y)
    assert abs(metrics.roc_auc(noise, baseline.cross_validated_probabilities(x, noise, groups)[:, 1]) - 0.5) < 0.15


def test_errors_are_clear(tmp_path: Path) -> None:
    x = np.zeros((6, 4))
    with pytest.raises(baseline.BaselineError, match="at least 5 patients"):
        baseline.cross_validated_probabilities(x, np.array([0, 1] * 3), np.array(list("aabbcc")))
    with pytest.raises(baseline.BaselineError, match="same label"):
        baseline.cross_validated_probabilities(x, np.zeros(6, int), np.array(list("abcdef")))
    with pytest.raises(baseline.BaselineError, match="knee_bone_seg"):
        baseline.features("knee_bone_seg", tmp_path)
    assert train_main(["baseline", "physis_fracture", "--data", str(tmp_path)]) == 2  # no manifest


@pytest.mark.slow
def test_physis_histogram_baseline_stays_near_chance(tmp_path: Path) -> None:
    from training.synth import physis_fracture

    physis_fracture.generate(tmp_path, 100, 5, workers=2)
    out = tmp_path / "baseline.json"
    assert train_main(["baseline", "physis_fracture", "--data", str(tmp_path), "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["n"] > 150 and result["patients"] == 100 and min(result["class_counts"]) > 50
    assert result["auc"] < 0.7  # measured 0.44 on 120 studies (seed 5)


@pytest.mark.slow
def test_hrpqct_histogram_baseline_stays_well_below_the_cnn_target(tmp_path: Path) -> None:
    from training.synth import hrpqct_motion

    hrpqct_motion.generate(tmp_path, 48, 5, workers=2)
    result = baseline.run_baseline("hrpqct_motion", tmp_path, bins=48)
    assert result["n"] == 48 and len(result["class_counts"]) >= 4
    # motion does change the density histogram (blur lowers the cortical peak, streaks spread it), so the
    # baseline is above chance, but far from the 0.80 the CNN must reach: measured 0.50 (seed 5)
    assert 0.0 < result["kappa_quadratic"] < 0.65


@pytest.mark.slow
def test_spine_histogram_baseline_stays_well_below_the_cnn_target(tmp_path: Path) -> None:
    from training.synth import spine_bmd

    spine_bmd.generate(tmp_path, 40, 5, workers=2)
    result = baseline.run_baseline("spine_bmd", tmp_path)
    assert result["n"] == 40 and len(result["class_counts"]) == 3
    # bone density is what the task grades, but two thirds of the studies are contrast-enhanced, which puts
    # kidneys, liver and vessels into the trabecular HU range by a varying amount: measured patient-level
    # macro-F1 0.53, QWK 0.25 here (0.54 / 0.45 before that confounder); fitted on 140 training studies it
    # scores 0.41 / 0.26 on the fresh-seed hold-out where the shipped network scores 0.82 / 0.78
    # (models/README.md). The CNN must reach vertebra macro-F1 0.75.
    assert result["macro_f1"] < 0.6 and result["kappa_quadratic"] < 0.4
