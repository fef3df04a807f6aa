"""The shipped spine BMD bundle (``models/spine_bmd/current``) on fresh synthetic lumbar CT, as issue 8 asks.

Fresh seed (the recipe uses seeds 1 and 2; models/README.md reports 40 studies of seed 2), evaluated through the
same code path as ``dicomnode-train evaluate`` (profile pass for the levels, the detector on the mid-body slices,
the bundle's class offsets). Deterministic on CPU, so a failure means the bundle or the pipeline regressed, not
bad luck. 10 studies (40 vertebrae, about 2 minutes) are a small, noisy sample: macro-F1 0.66 here against 0.80
on models/README.md's 160 vertebrae (only 5 osteoporotic vertebrae here); the bounds sit below this sample's
measured figures, so this test guards against regressions and the issue's target is shown on the larger set.
Since the generator draws contrast-enhanced studies (issue 4's confounder), 8 of these 10 are enhanced (3 arterial), so the
test also covers level finding next to a contrast-filled aorta.
Skipped when no bundle is committed.
"""

from __future__ import annotations

from pathlib import Path

from tests.unit._shipped import shipped_metrics
from training.synth import spine_bmd as synth

FRESH_SEED = 11
N_STUDIES = 10
MIN_F1 = 0.55  # measured 0.66 on this sample (28 normal, 7 osteopenia, 5 osteoporosis vertebrae)
MIN_SENS = 0.5  # measured 0.79 / 0.71 / 0.60


def test_shipped_spine_bundle_labels_levels_and_classifies_vertebrae(tmp_path: Path) -> None:
    m = shipped_metrics("spine_bmd", synth, N_STUDIES, FRESH_SEED, tmp_path, workers=2)
    assert m["studies"] == N_STUDIES and m["vertebrae_missed"] == 0
    assert m["level_accuracy"] >= 0.95, m  # every study's L1-L4 named right
    assert m["vertebra_macro_f1"] >= MIN_F1, m
    assert min(v for v in m["sensitivity_per_class"].values() if v is not None) >= MIN_SENS, m
