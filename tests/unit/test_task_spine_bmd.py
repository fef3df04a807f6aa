"""spine_bmd: level finding, detection post-processing, class rules, paper metrics, and a tiny trained bundle end to end."""

from __future__ import annotations

import numpy as np
import pytest

from inference.tasks.spine_bmd_levels import (
    BodyRun,
    SliceDetection,
    aggregate_vertebra,
    body_runs,
    find_levels,
    label_runs,
    patient_class,
    select_slices,
    slice_class_scores,
)
from training.tasks.spine_bmd_eval import SliceEval, level_accuracy, paper_metrics

# --------------------------------------------------------------------------- a numpy lumbar phantom (test double)

TRAB = {"normal": 220.0, "osteopenia": 135.0, "osteoporosis": 70.0}


def lumbar_phantom(classes: dict[str, str], *, slice_mm: float = 2.0, px: float = 0.8, size: int = 160,
                   seed: int = 0, top_partial: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Axial stack (ascending z) with L1-L5 bodies (cortical shell), discs, posterior arches and a sacrum.

    Returns the HU volume, slice positions (mm) and each level's true mid-body z.
    """
    rng = np.random.default_rng(seed)
    body_h, disc_h = 28.0, 10.0
    levels = ["L5", "L4", "L3", "L2", "L1"]  # inferior to superior
    z = 20.0  # sacrum top
    extents: dict[str, tuple[float, float]] = {}
    for lv in levels:
        z0 = z + disc_h
        extents[lv] = (z0, z0 + body_h)
        z = z0 + body_h
    z_top = z + (disc_h + 12.0 if top_partial else 6.0)  # a cut T12 body at the top
    positions = np.arange(0.0, z_top, slice_mm)
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = size / 2, size * 0.45
    rx, ry = 24.0 / px, 17.0 / px
    ell = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    body = ell <= 1.0
    shell = body & (ell >= (1 - 2.2 / 17.0) ** 2)
    arch = (((xx - cx) / (14 / px)) ** 2 + ((yy - (cy + 30 / px)) / (10 / px)) ** 2 <= 1.0) & \
           (((xx - cx) / (9 / px)) ** 2 + ((yy - (cy + 30 / px)) / (6 / px)) ** 2 > 1.0)
    soft = ((xx - cx) / (size * 0.48)) ** 2 + ((yy - size / 2) / (size * 0.40)) ** 2 <= 1.0
    vol = np.full((len(positions), size, size), -1000.0, dtype=np.float32)
    for k, zk in enumerate(positions):
        sl = vol[k]
        sl[soft] = 40.0
        kind = None
        for lv, (a, b) in extents.items():
            if a <= zk <= b:
                kind = lv
                near_plate = min(zk - a, b - zk) < 1.5
                sl[body] = 700.0 if near_plate else TRAB[classes.get(lv, "normal")]
                sl[shell] = 700.0
                sl[arch] = 600.0
        if kind is None and zk < 20.0:  # sacrum + ilia: a wide bony block
            sl[body] = 250.0
            sl[shell] = 650.0
            wings = (np.abs(xx - cx) > 30 / px) & (np.abs(xx - cx) < 70 / px) & (np.abs(yy - cy) < 10 / px)
            sl[wings] = 600.0
        elif kind is None and zk > extents["L1"][1] + disc_h:  # T12, cut by the top of the stack
            sl[body] = 200.0
            sl[shell] = 700.0
        elif kind is None:
            sl[body] = 90.0  # disc
    vol += rng.normal(0.0, 20.0, vol.shape).astype(np.float32)
    mids = {lv: (a + b) / 2 for lv, (a, b) in extents.items()}
    return vol, positions, mids


# --------------------------------------------------------------------------- level finding


@pytest.mark.parametrize("slice_mm", [1.0, 2.5])
def test_levels_found_and_named_from_sacrum(slice_mm: float) -> None:
    classes = {"L1": "osteoporosis", "L2": "osteoporosis", "L3": "osteopenia", "L4": "normal", "L5": "osteoporosis"}
    vol, pos, mids = lumbar_phantom(classes, slice_mm=slice_mm)
    geom = find_levels(vol, pos, (0.8, 0.8))
    names = {r.name: r for r in geom.runs}
    assert set(names) == {"L1", "L2", "L3", "L4", "L5"}
    assert geom.sacrum is not None and geom.sacrum.center_mm < mids["L5"]
    for lv, z in mids.items():
        assert abs(names[lv].center_mm - z) < 4.0, (lv, names[lv], z)
    assert [r.name for r in geom.runs] == ["L1", "L2", "L3", "L4", "L5"]  # superior first


def test_osteoporotic_bodies_are_not_mistaken_for_discs() -> None:
    """Trabecular HU of osteoporosis (70) is below the disc's (90): the profile uses the cortex, not the mean."""
    vol, pos, mids = lumbar_phantom({lv: "osteoporosis" for lv in ("L1", "L2", "L3", "L4", "L5")})
    geom = find_levels(vol, pos, (0.8, 0.8))
    assert sorted(r.name for r in geom.runs) == ["L1", "L2", "L3", "L4", "L5"]


def test_body_runs_close_gaps_split_long_runs_and_drop_slivers() -> None:
    pos = np.arange(0, 120, 1.0)
    prof = np.zeros_like(pos)
    prof[10:40] = 5  # body 30 mm
    prof[25] = 0  # a 1 mm noise gap inside it: closed
    prof[50:54] = 5  # a 4 mm sliver: dropped
    prof[60:115] = 5  # 55 mm: two bodies whose disc was lost, split at the minimum
    prof[87] = 1
    runs = body_runs(prof, pos)
    spans = sorted((r.i0, r.i1) for r in runs)
    assert spans[0] == (10, 39)
    assert len(spans) == 3 and spans[1][1] < spans[2][0]
    assert all(r.height_mm >= 12 for r in runs)


def test_label_runs_without_sacrum_takes_lowest_as_l5() -> None:
    runs = [BodyRun(80, 100, 80, 100), BodyRun(40, 60, 40, 60), BodyRun(5, 25, 5, 25)]
    named, sacrum = label_runs(runs, widths=[40, 40, 42], bottom_partial=False)
    assert sacrum is None
    assert [r.name for r in named] == ["L3", "L4", "L5"]
    named, sacrum = label_runs(runs, widths=[40, 40, 120], bottom_partial=False)  # wide = sacrum + ilia
    assert sacrum is not None and [r.name for r in named] == ["L4", "L5"]


def test_select_slices_spreads_within_the_central_part() -> None:
    pos = np.arange(0, 100, 1.0)
    run = BodyRun(20, 49, 19.5, 49.5)
    picks = select_slices(run, pos, central_fraction=0.4, count=3)
    assert len(picks) == 3 and picks == sorted(picks)
    assert all(abs(pos[i] - run.center_mm) <= 0.2 * run.height_mm for i in picks)
    assert picks[-1] - picks[0] >= 8  # spread, not adjacent
    thin = BodyRun(10, 10, 9.9, 10.1)
    assert select_slices(thin, pos) == [10]


# --------------------------------------------------------------------------- detection post-processing and rules


def test_slice_scores_group_class_hypotheses_of_one_body() -> None:
    boxes = np.array([[10, 10, 50, 40], [11, 10, 50, 41], [12, 11, 49, 40], [200, 200, 240, 230]], float)
    labels = np.array([2, 1, 3, 3])
    scores = np.array([0.8, 0.3, 0.1, 0.95])
    det = slice_class_scores(boxes, labels, scores, slice_index=7, region=(0, 0, 100, 100))
    assert det is not None and det.slice_index == 7
    assert det.box == (10.0, 10.0, 50.0, 40.0)  # the out-of-region box is ignored despite its score
    np.testing.assert_allclose(det.probs, np.array([0.3, 0.8, 0.1]) / 1.2)
    assert slice_class_scores(boxes, labels, scores, region=(300, 300, 400, 400)) is None
    assert slice_class_scores(np.zeros((0, 4)), np.zeros(0), np.zeros(0)) is None


def test_vertebra_aggregation_and_patient_is_lowest() -> None:
    run = BodyRun(0, 10, 0, 10, name="L2")
    dets = [SliceDetection(3, (0, 0, 10, 10), np.array([0.6, 0.3, 0.1]), 0.9),
            SliceDetection(5, (1, 1, 11, 11), np.array([0.2, 0.6, 0.2]), 0.95)]
    v = aggregate_vertebra(run, dets)
    assert v is not None and v.level == "L2" and v.slice_index == 5 and v.box == (1, 1, 11, 11)
    np.testing.assert_allclose(v.probs, [0.4, 0.45, 0.15])
    assert v.class_name == "osteopenia"
    assert aggregate_vertebra(run, []) is None
    normal = aggregate_vertebra(BodyRun(0, 1, 0, 1, name="L1"), [SliceDetection(0, (0, 0, 1, 1), np.array([.9, .1, 0]), .9)])
    assert normal is not None
    cls, conf = patient_class([normal, v])
    assert cls == 1  # the lowest (most severe) of the vertebrae
    assert conf == pytest.approx(1 - 0.9 * 0.4)
    with pytest.raises(ValueError):
        patient_class([])


def test_paper_metrics_follow_their_definitions() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    s = SliceEval("a", pred_boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float),
                  pred_labels=np.array([1, 3, 2]), pred_scores=np.array([0.9, 0.8, 0.7]),
                  gt_boxes=gt, gt_labels=np.array([1, 2]))
    m = paper_metrics([s])
    # class1: TP1 FP0 FN0 TN1; class2: TP0 FP1 (stray box) FN1 TN1; class3: TP0 FP1 FN0 TN1
    assert m["paper_map"] == pytest.approx(100 * (1 + 0 + 0) / 3)
    assert m["paper_recall"] == pytest.approx(100 * (1 + 0) / 2)  # class 3 has no positives: left out
    assert m["paper_acc"] == pytest.approx(100 * (0.5 + 0 + 0) / 3)


def test_level_accuracy_needs_every_level_right() -> None:
    truth = [{"L1": 100.0, "L2": 70.0}, {"L1": 100.0, "L2": 70.0}]
    pred = [{"L1": 103.0, "L2": 69.0}, {"L1": 70.0, "L2": 40.0}]
    assert level_accuracy(pred, truth) == 0.5
