"""The clinic's simple baselines give the known answer on constructed sets (issue 34)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.clinic_baselines import (
    MARGIN,
    compare,
    hu_class,
    run_clinic_baselines,
    spine_roi_hu,
    spine_rule,
)
from training.clinic_baselines_hrpqct import OrdinalLine, log_features, soft_tissue_features
from training.clinic_baselines_knee import KneeVolume, atlas_predict, threshold_segment
from training.data import load_records


def test_the_160_110_rule() -> None:
    assert [hu_class(v) for v in (250.0, 160.1, 160.0, 130.0, 110.0, 109.9, 40.0)] == [0, 0, 1, 1, 1, 2, 2]


@pytest.fixture(scope="module")
def spine_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.synth import spine_bmd

    root = tmp_path_factory.mktemp("spine")
    spine_bmd.generate(root, 3, 11, workers=1, params={"phase": "native"})
    return root


def _plain(level: dict) -> bool:
    """A body without endplate sclerosis or a fracture (issue 34's generator draws both)."""
    return not level.get("endplate_sclerosis") and not level.get("fracture")


def test_spine_roi_reads_the_phantoms_trabecular_hu(spine_studies: Path) -> None:
    """The ROI at the levels the task's level finder names reads the HU the phantom was built with (on bodies
    without endplate sclerosis or a fracture, whose dense bands can reach the mid-body slices of a short body)."""
    from inference.series import load_series
    from inference.tasks.spine_bmd import anterior_is_up, slice_positions

    checked = 0
    for rec in load_records(spine_studies):
        series = load_series(rec.files)
        hu = spine_roi_hu(series.volume(), slice_positions(series), (float(series.spacing[1]),
                          float(series.spacing[2])), anterior_up=anterior_is_up(series))
        for lv, info in rec.row["levels"].items():
            if lv in hu and _plain(info):
                assert hu[lv] == pytest.approx(info["trabecular_hu"], abs=10.0), lv
                checked += 1
    assert checked >= 5  # the plain bodies among L1-L4 of three studies, all but a few found


def test_spine_rule_scores_one_when_the_truth_is_the_rule(spine_studies: Path) -> None:
    """Relabel every vertebra with the rule applied to its known HU: the rule's macro-F1 is then 1 (and
    drops when the labels are the rule shifted by one class)."""
    records = load_records(spine_studies)
    for rec in records:
        levels = rec.row["levels"]
        # levels within 5 HU of a cut are ambiguous for a noisy ROI: leave them unlabelled
        rec.row["vertebrae"] = {lv: ("normal", "osteopenia", "osteoporosis")[hu_class(i["trabecular_hu"])]
                                for lv, i in levels.items()
                                if _plain(i) and min(abs(i["trabecular_hu"] - 160), abs(i["trabecular_hu"] - 110)) > 5}
        rec.row["boxes"] = []
    result = spine_rule(records)
    assert result["n"] >= 5 and result["vertebra_macro_f1"] == pytest.approx(1.0)
    assert result["vertebra_accuracy"] == 1.0
    for rec in records:
        rec.row["vertebrae"] = {lv: "osteoporosis" if c == "normal" else "normal"
                                for lv, c in rec.row["vertebrae"].items()}
    assert spine_rule(records)["vertebra_accuracy"] == 0.0


def _stack(sd: float, streak: float, rng: np.random.Generator) -> np.ndarray:
    """Eight 96x96 slices: air, a round limb of muscle (35 mg HA/cm3) with noise ``sd`` and row streaks."""
    yy, xx = np.mgrid[0:96, 0:96]
    limb = (yy - 48) ** 2 + (xx - 48) ** 2 < 40 ** 2
    out = np.full((8, 96, 96), -208.0)
    for k in range(8):
        img = 35.0 + rng.normal(0, sd, (96, 96)) + streak * np.sin(xx * 2.5)[None][0]
        out[k][limb] = img[limb]
    return out


def test_soft_tissue_features_measure_the_known_sd_and_streaks() -> None:
    rng = np.random.default_rng(0)
    sd, hf_median, row_hf, col_hf, air_sd = soft_tissue_features(_stack(10.0, 0.0, rng))
    assert sd == pytest.approx(10.0, rel=0.05) and air_sd == 0.0
    # white noise: a neighbour difference has variance 2 sd^2; the 5x5 residual's median |.| is 0.674 * 0.98 sd
    assert row_hf == pytest.approx(2 * 10.0 ** 2, rel=0.1) and col_hf == pytest.approx(2 * 10.0 ** 2, rel=0.1)
    assert hf_median == pytest.approx(0.674 * 10.0 * np.sqrt(1 - 1 / 25), rel=0.1)
    _, _, row_s, col_s, _ = soft_tissue_features(_stack(10.0, 30.0, rng))
    assert row_s > 5 * col_s  # streaks varying along the rows raise only the row energy


def test_ordinal_fit_recovers_a_monotone_grade() -> None:
    rng = np.random.default_rng(1)
    grade = np.repeat(np.arange(1, 6), 12)
    x = log_features(np.array([soft_tissue_features(_stack(5.0 + 6.0 * g, 0.0, rng)) for g in grade]))
    model = OrdinalLine().fit(x, grade)
    assert np.array_equal(model.predict(x), grade)
    from training.metrics import roc_auc

    assert roc_auc((grade >= 4).astype(int), model.score(x)) == 1.0  # the rescan score separates grades 4-5
    shuffled = rng.permutation(grade)  # a grade that the features do not carry is not recovered
    assert not np.array_equal(OrdinalLine().fit(x, shuffled).predict(x), shuffled)


def _knee(shift_mm: float = 0.0) -> KneeVolume:
    """A T1 'knee' (rows superior -> inferior): bright femur above a dark joint, tibia and fibula below."""
    lab = np.zeros((6, 80, 60), dtype=np.uint8)
    lab[:, 6:36, 15:45] = 1
    lab[:, 44:74, 12:40] = 2
    lab[:, 48:74, 46:52] = 3
    vol = np.where(lab > 0, 900.0, 0.0).astype(np.float32)
    limb = np.zeros_like(vol, dtype=bool)
    limb[:, 2:78, 5:56] = True
    vol[limb & (lab == 0)] = 330.0  # muscle
    for b in (1, 2, 3):  # a dark cortex around every bone
        m = lab == b
        from scipy import ndimage

        ring = ndimage.binary_dilation(m, iterations=1, structure=np.ones((1, 3, 3), bool)) & ~m
        vol[ring] = 40.0
    vol[:, 36:44, :] = np.where(limb[:, 36:44, :], 150.0, 0.0)  # the joint line, darker than muscle
    affine = np.array([[0.0, 0.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 40.0 + shift_mm],
                       [0.0, 0.0, 0.0, 1.0]])  # slice -> y (3 mm), row -> -z (1 mm), col -> x
    return KneeVolume(vol, lab, affine, (3.0, 1.0, 1.0), fat_sat=False, laterality="R")


def test_coordinate_atlas_is_exact_on_identical_knees_and_follows_patient_coordinates() -> None:
    target = _knee()
    assert np.array_equal(atlas_predict(target, [_knee(), _knee()]), target.labels)
    shifted = atlas_predict(target, [_knee(10.0)] * 2)  # the others' joint is 10 mm higher in patient z
    assert np.array_equal(shifted[:, :-10], target.labels[:, 10:])


def test_threshold_and_components_find_the_three_bones() -> None:
    k = _knee()
    pred = threshold_segment(k)
    from training.metrics import dice

    for b in (1, 2, 3):
        assert dice(pred == b, k.labels == b) > 0.8, b


def test_compare_flags_a_margin_below_the_required() -> None:
    base = {"coordinate_atlas": {"dice_mean": 0.88}, "threshold_components": {"dice_mean": 0.3},
            "broken": {"error": "unreadable"}}
    c = compare("knee_bone_seg", {"dice_mean": 0.97}, base)
    assert c["baseline"] == "coordinate_atlas" and c["margin"] == pytest.approx(0.09) and c["below_margin"]
    assert not compare("knee_bone_seg", {"dice_mean": 0.99}, base)["below_margin"]
    assert compare("knee_bone_seg", {}, base) is None and MARGIN == 0.10
    assert compare("wrist_fracture", {"study_auc": 0.97}, {"histogram": {"auc": 0.5}})["margin"] == pytest.approx(0.47)


def test_a_baseline_that_cannot_be_scored_says_why(tmp_path: Path) -> None:
    out = run_clinic_baselines("knee_bone_seg", [])
    assert "error" in out["coordinate_atlas"] and "at least 2" in out["coordinate_atlas"]["error"]
    assert run_clinic_baselines("unknown_task", []) == {}
    json.dumps(out)
