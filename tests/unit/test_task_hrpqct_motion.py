"""hrpqct_motion end to end: scan aggregation, manifest parsing, metrics, routing, both scanner geometries,
a tiny bundle trained through ``dicomnode-train train`` / ``evaluate`` and run through ``dicomnode analyze``.

The test scans are small (32 x 32 matrix) but have the real slice counts and spacings of XtremeCT (110 slices,
82 um) and XtremeCT II (168 slices, 61 um); motion is simulated during a parallel-beam acquisition and
reconstructed by FBP (``training.synth.tomo``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import CTImageStorage

from inference import codes
from inference.errors import BundleError
from inference.findings import ImageRef
from inference.hrpqct import select_slices
from inference.tasks.hrpqct_motion import (
    ROUNDING_CUTPOINTS,
    aggregate_scan,
    finding_site,
    grade_from_expected,
    rescan_statement,
    scan_findings,
    scan_statement,
)
from training.data import DataError
from training.synth import tomo
from training.synth.common import (
    Equipment,
    Patient,
    Study,
    UidSource,
    base_dataset,
    new_series,
    set_pixel_data,
    set_rescale,
    write_dataset,
)
from training.tasks.hrpqct_motion import (
    ADAPTER,
    MotionConfig,
    MotionEvalResult,
    choose_grade_cutpoints,
    choose_rescan_threshold,
    grade_of,
    scan_metrics,
)

GEOMETRIES: dict[str, dict[str, Any]] = {
    "XtremeCT": {"slices": 110, "spacing": 0.082},
    "XtremeCT II": {"slices": 168, "spacing": 0.0607},
}
MATRIX = 32
TINY = {"channels": [4, 8, 8, 8, 8], "hidden": 8}


def _phantom(n: int, slices: int, rng: np.random.Generator) -> np.ndarray:
    """Density (mg HA/cm3-like) of a bone cross-section: soft tissue, cortical shell, trabecular texture."""
    yy, xx = np.mgrid[:n, :n] - n // 2
    base = np.zeros((slices, n, n), dtype=np.float32)
    for z in range(slices):
        a, b = n * (0.30 + 0.02 * np.sin(z / 20)), n * 0.24
        r = np.sqrt((xx / a) ** 2 + (yy / b) ** 2)
        img = np.where(np.sqrt(xx**2 + yy**2) < n * 0.46, 40.0, -200.0)
        img = np.where(r < 1.0, 900.0, img)
        img = np.where(r < 0.8, 180.0 + 120.0 * (rng.random((n, n)) > 0.6), img)
        base[z] = img
    return base


def write_scan(root: Path, *, geometry: str = "XtremeCT", grade: int = 1, seed: int = 0, patient_id: str = "P1",
               body_part: str = "RADIUS", manufacturer: str = "SCANCO Medical AG", model: str | None = None,
               study_uid: str | None = None) -> dict[str, Any]:
    """Write one HR-pQCT-like CT series (motion of the given grade during the scan); return its manifest row."""
    g = GEOMETRIES[geometry]
    rng = np.random.default_rng(seed)
    uids = UidSource(f"hrpqct-test:{seed}:{patient_id}")
    patient = Patient(name="TEST^MOTION", patient_id=patient_id, birth_date=dt.date(1960, 5, 1), sex="F",
                      age_years=64.0, exam_date=dt.date(2024, 5, 2))
    study = Study(study_uid=study_uid or uids.make("study"), date=patient.exam_date, time=dt.time(10, 0),
                  accession="A1", study_id="1", description="HR-pQCT")
    series = new_series(uids, 1, "CT", body_part, description=f"{body_part} HR-pQCT")
    equipment = Equipment(manufacturer=manufacturer, model=model or geometry)
    geom = tomo.ParallelBeam(MATRIX, 48)
    views = geom.n_views
    shifts = np.zeros((views, 2))
    amp = [0.0, 0.6, 1.5, 3.0, 5.0][grade - 1]
    start = int(rng.integers(views // 4, 3 * views // 4))
    shifts[start:] = amp * np.array([np.cos(rng.uniform(0, np.pi)), np.sin(rng.uniform(0, np.pi))])
    vol = _phantom(MATRIX, g["slices"], rng) / 1000.0
    sino = tomo.forward_project(vol, geom, shifts=shifts)
    recon = tomo.fbp(sino, geom) * 1000.0 + rng.normal(0, 15, vol.shape)
    frame_uid = uids.make("frame")
    for i in range(g["slices"]):
        ds = base_dataset(CTImageStorage, patient, study, series, equipment, sop_instance_uid=uids.make("sop", i),
                          instance_number=i + 1)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = "60"
        ds.AcquisitionNumber = 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [0.0, 0.0, round(i * g["spacing"], 4)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [g["spacing"], g["spacing"]]
        ds.SliceThickness = g["spacing"]
        set_pixel_data(ds, np.clip(np.rint(recon[i]), -2000, 4000).astype(np.int16), bits_stored=16, signed=True)
        set_rescale(ds, 1.0, 0.0)
        ds.WindowCenter, ds.WindowWidth = "400", "1600"
        write_dataset(ds, root)
    return {"study_uid": study.study_uid, "patient_id": patient_id, "label": grade,
            "motion_ssd": tomo.opposed_projection_ssd(sino[:: max(1, g["slices"] // 8)]), "synthetic": True,
            "geometry": geometry}


# --- aggregation and post-processing -----------------------------------------------------------------


def test_scan_grade_is_argmax_of_mean_probabilities_not_majority_vote():
    # 5 slices say grade 1 weakly, 3 say grade 4 strongly: the majority vote is 1, the mean favours 4
    weak1 = [0.4, 0.3, 0.3, 0.0, 0.0]
    strong4 = [0.0, 0.0, 0.0, 1.0, 0.0]
    scan = aggregate_scan(np.array([weak1] * 5 + [strong4] * 3))
    assert scan.slice_grades == (1, 1, 1, 1, 1, 4, 4, 4)
    np.testing.assert_allclose(scan.mean_probs, [0.25, 0.1875, 0.1875, 0.375, 0.0])
    assert scan.grade == 4 and scan.rescan
    assert scan.p_rescan == pytest.approx(0.375)
    assert scan.grade_probability == pytest.approx(0.375)
    assert scan.expected_grade == pytest.approx(0.25 + 2 * 0.1875 + 3 * 0.1875 + 4 * 0.375)


def test_expected_grade_aggregation_and_rescan_threshold():
    p = np.array([[0.0, 0.5, 0.0, 0.0, 0.5]] * 8)  # bimodal: argmax 2 (tie -> lower), expected 3.5 -> 4
    assert aggregate_scan(p).grade == 2
    assert not aggregate_scan(p).rescan
    assert aggregate_scan(p).p_rescan == pytest.approx(0.5)
    exp = aggregate_scan(p, aggregation="expected")
    assert exp.grade == 4 and exp.rescan
    assert aggregate_scan(np.eye(5)[[2] * 8]).rescan is False
    assert aggregate_scan(np.eye(5)[[2] * 8], rescan_min_grade=3).rescan is True
    assert aggregate_scan(np.eye(5)[[4] * 8]).p_rescan == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [np.ones((8, 4)) / 4, np.ones((0, 5)), np.full((8, 5), 0.5), -np.eye(5)[[0] * 8]])
def test_aggregate_rejects_non_probabilities(bad):
    with pytest.raises(ValueError):
        aggregate_scan(bad)


def test_finding_site_from_body_part_and_description():
    assert finding_site(_ds(BodyPartExamined="SPEICHE")) == codes.DISTAL_RADIUS
    assert finding_site(_ds(BodyPartExamined="ANKLE")) == codes.DISTAL_TIBIA
    assert finding_site(_ds(BodyPartExamined="", SeriesDescription="Tibia distal XCT2")) == codes.DISTAL_TIBIA
    assert finding_site(_ds(BodyPartExamined="KNEE")) is None


def _ds(**kw: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for k, v in kw.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(("row", "grade"), [({"label": 3}, 3), ({"label": "grade 5"}, 5), ({"grade": 2.0}, 2),
                                            ({"motion_grade": "4"}, 4), ({"grade": 1, "label": 5}, 1)])
def test_grade_of_manifest_rows(row, grade):
    assert grade_of(row) == grade


@pytest.mark.parametrize("row", [{"label": 0}, {"label": 6}, {"label": "severe"}, {"label": 2.5}, {}])
def test_grade_of_rejects_bad_rows(row):
    with pytest.raises(DataError):
        grade_of(row)


def test_scan_metrics_rescan_decision_and_motion_correlation():
    y = np.array([1, 2, 3, 4, 5, 4, 1, 3])
    probs = np.eye(5)[[0, 1, 2, 3, 4, 2, 0, 3]]  # scan 6 (grade 4) missed as 3; scan 8 (grade 3) called 4
    ssd = np.array([0.1, 0.2, 0.3, 0.5, 0.9, 0.35, 0.05, 0.45])
    m, pred, tables = scan_metrics(y, probs, np.zeros(8, int), np.zeros(8, int), ssd)
    assert pred.tolist() == [1, 2, 3, 4, 5, 3, 1, 4]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["rescan_sensitivity"] == pytest.approx(2 / 3)  # grade >= 4: scans 4, 5, 6
    assert m["rescan_specificity"] == pytest.approx(4 / 5)
    assert np.asarray(m["confusion_matrix"]).sum() == 8 and m["confusion_matrix"][3][2] == 1
    assert 0.8 < m["kappa_quadratic"] < 1.0
    assert m["motion_ssd_spearman_pred"] > 0.9
    assert tables["motion_ssd by predicted grade"]["grade 5"]["n"] == 1
    perfect, _, _ = scan_metrics(y, np.eye(5)[y - 1], np.zeros(8, int), np.zeros(8, int), np.full(8, np.nan))
    assert perfect["kappa_quadratic"] == pytest.approx(1.0) and perfect["macro_f1"] == pytest.approx(1.0)
    assert np.isnan(perfect["motion_ssd_spearman_pred"])


def test_rescan_operating_point_recommends_below_grade_4():
    p = np.array([[0.2, 0.2, 0.3, 0.2, 0.1]] * 8)  # grade 3, P(grade >= 4) = 0.3
    assert not aggregate_scan(p).rescan
    at = aggregate_scan(p, rescan_threshold=0.3)
    assert at.grade == 3 and at.rescan and at.rescan_threshold == 0.3
    assert not aggregate_scan(p, rescan_threshold=0.31).rescan
    assert aggregate_scan(np.eye(5)[[4] * 8], rescan_threshold=0.99).rescan  # grade >= 4 always recommends
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError):
            aggregate_scan(p, rescan_threshold=bad)


def test_rescan_wording_states_the_rule_that_decided():
    p = np.array([[0.2, 0.2, 0.3, 0.2, 0.1]] * 8)  # grade 3, P(grade >= 4) = 0.3
    assert rescan_statement(aggregate_scan(p)) == "grade 3 < 4: no rescan needed"
    assert rescan_statement(aggregate_scan(p, rescan_threshold=0.25)) == "P(grade>=4)=0.30 >= 0.25: rescan recommended"
    assert rescan_statement(aggregate_scan(p, rescan_threshold=0.4)) == \
        "grade 3 < 4, P(grade>=4)=0.30 < 0.40: no rescan needed"
    assert rescan_statement(aggregate_scan(np.eye(5)[[4] * 8], rescan_threshold=0.99)) == \
        "grade 5 >= 4: rescan recommended"
    scan = aggregate_scan(p, rescan_threshold=0.25)
    assert scan_statement(scan) == "motion grade 3 (p=0.30); P(grade>=4)=0.30 >= 0.25: rescan recommended"
    classes, overlay = scan_findings(scan, [ImageRef(f"1.2.3.{i}") for i in range(8)], None)
    (rescan,) = [c for c in classes if c.finding == codes.RESCAN_RECOMMENDED]
    assert rescan.value == codes.YES and rescan.threshold == 0.25
    assert "rescan" not in overlay.title.lower()  # the title names the test; the statement says the result


def test_choose_rescan_threshold_reaches_target_sensitivity():
    true = np.array([4, 4, 5, 4, 3, 1, 2, 4])
    pred = np.array([4, 3, 5, 3, 3, 1, 2, 2])  # the grade rule catches 2 of the 5 scans graded >= 4
    p_rescan = np.array([0.9, 0.45, 0.95, 0.3, 0.5, 0.01, 0.1, 0.2])
    assert choose_rescan_threshold(true, p_rescan, pred, target=0.4) is None  # 2/5 already
    assert choose_rescan_threshold(true, p_rescan, pred, target=0.6) == pytest.approx(0.45)  # 3/5
    assert choose_rescan_threshold(true, p_rescan, pred, target=0.8) == pytest.approx(0.3)  # 4/5
    assert choose_rescan_threshold(true, p_rescan, pred, target=1.0) == pytest.approx(0.2)  # 5/5
    assert choose_rescan_threshold(np.array([1, 2]), np.array([0.2, 0.3]), np.array([1, 2]), target=0.9) is None
    # the chosen point reaches the target in scan_metrics, which applies it the way the node does
    probs = np.stack([np.r_[(1 - r) / 3, (1 - r) / 3, (1 - r) / 3, r, 0.0] for r in p_rescan])
    m, _, _ = scan_metrics(true, probs, np.zeros(8, int), np.zeros(8, int), np.full(8, np.nan),
                           rescan_threshold=0.3)
    assert m["rescan_sensitivity"] == pytest.approx(4 / 5) and m["rescan_threshold"] == 0.3


def test_tune_chooses_the_rescan_threshold_on_validation():
    true = np.array([4, 4, 5, 4, 3, 1])
    probs = np.array([[0.0, 0.1, 0.5, 0.4, 0.0], [0.0, 0.2, 0.6, 0.2, 0.0], [0, 0, 0, 0, 1.0],
                      [0.0, 0.0, 0.4, 0.6, 0.0], [0.0, 0.3, 0.6, 0.1, 0.0], [1.0, 0, 0, 0, 0]])
    res = MotionEvalResult(metrics={}, y_true=true - 1, y_prob=probs, true_grade=true,
                           pred_grade=probs.argmax(1) + 1, motion_ssd=np.full(6, np.nan))
    cfg, note = ADAPTER.tune(res, MotionConfig(rescan_target_sensitivity=0.9))
    assert cfg.rescan_threshold == pytest.approx(0.2) and "validation" in note  # 4 of 4 needs the 0.2 scan
    cfg, note = ADAPTER.tune(res, MotionConfig(rescan_target_sensitivity=0.7))
    assert cfg.rescan_threshold == pytest.approx(0.4)  # 3 of 4
    same, note = ADAPTER.tune(res, MotionConfig(rescan_threshold=0.25))
    assert same.rescan_threshold == 0.25 and note == ""  # no target: the configured point stays
    none_pos = MotionEvalResult(metrics={}, y_true=np.zeros(2, int), y_prob=np.eye(5)[[0, 0]],
                                true_grade=np.ones(2, int), pred_grade=np.ones(2, int))
    kept, note = ADAPTER.tune(none_pos, MotionConfig(rescan_target_sensitivity=0.9))
    assert kept.rescan_threshold is None and "not chosen" in note


def test_scan_metrics_report_the_generating_grade_ceiling_and_rescan_auc():
    y = np.array([1, 2, 3, 4, 4, 3])
    generating = np.array([1, 2, 3, 3, 4, 3])  # the rater called one grade-3 motion a 4
    probs = np.array([[0.9, 0.05, 0, 0.05, 0], [0, 0.9, 0, 0.1, 0], [0, 0, 0.8, 0.2, 0], [0, 0, 0.7, 0.3, 0],
                      [0, 0, 0.1, 0.9, 0], [0, 0, 0.65, 0.35, 0]])  # P(grade >= 4) 0.05 0.1 0.2 0.3 0.9 0.35
    m, _, tables = scan_metrics(y, probs, np.zeros(6, int), np.zeros(6, int), np.full(6, np.nan),
                                generating_grade=generating)
    assert m["generating_grade_accuracy"] == pytest.approx(5 / 6)
    assert m["generating_grade_rescan_sensitivity"] == pytest.approx(1 / 2)
    assert 0.5 < m["generating_grade_kappa_quadratic"] < 1.0
    assert m["rescan_sensitivity"] == pytest.approx(1 / 2)  # the grade rule misses the 0.3 scan
    assert m["rescan_auc"] == pytest.approx(7 / 8)  # 0.3 ranks below the negative at 0.35
    points = tables["rescan operating points"]
    assert points["P(grade >= 4) >= 0.10"] == {"sensitivity": 1.0, "specificity": 0.25}
    assert points["P(grade >= 4) >= 0.30"] == {"sensitivity": 1.0, "specificity": 0.75}
    assert points["P(grade >= 4) >= 0.40"] == {"sensitivity": 0.5, "specificity": 1.0}
    plain, _, _ = scan_metrics(y, probs, np.zeros(6, int), np.zeros(6, int), np.full(6, np.nan))
    assert "generating_grade_accuracy" not in plain


def test_grade_cutpoints_grade_the_expected_grade():
    e = np.array([1.0, 1.49, 1.5, 2.2, 3.5, 4.49, 4.5, 5.0])
    assert grade_from_expected(e).tolist() == [1, 1, 2, 2, 4, 4, 5, 5]  # rounding half up
    assert grade_from_expected(e, (1.2, 2.0, 3.0, 4.4)).tolist() == [1, 2, 2, 3, 4, 5, 5, 5]
    p = np.array([[0.0, 0.5, 0.0, 0.0, 0.5]] * 8)  # expected 3.5
    assert aggregate_scan(p, aggregation="expected").grade == 4
    assert aggregate_scan(p, aggregation="expected", cutpoints=(1.5, 2.5, 3.6, 4.5)).grade == 3
    assert aggregate_scan(p, cutpoints=(1.5, 2.5, 3.6, 4.5)).grade == 2  # argmax ignores cut points
    for bad in ((1.5, 2.5, 3.5), (1.5, 3.5, 2.5, 4.5), (1.0, 2.5, 3.5, 4.5), (1.5, 2.5, 3.5, 5.0),
                (1.5, 2.5, float("nan"), 4.5)):
        with pytest.raises(ValueError):
            aggregate_scan(p, aggregation="expected", cutpoints=bad)
    with pytest.raises(ValueError, match="aggregation 'expected'"):
        MotionConfig(tune_grade_cutpoints=True)
    with pytest.raises(ValueError):
        MotionConfig(aggregation="expected", grade_cutpoints=(2.0, 1.0, 3.0, 4.0))


def test_choose_grade_cutpoints_corrects_a_biased_reader_and_keeps_rounding_otherwise():
    rng = np.random.default_rng(0)
    true = rng.integers(1, 6, 200)
    low = true - 0.6 + rng.uniform(-0.05, 0.05, true.size)  # reads every grade 0.6 too low
    k = lambda pred: scan_metrics(true, np.eye(5)[pred - 1], np.zeros(1, int), np.zeros(1, int),  # noqa: E731
                                  np.full(true.size, np.nan))[0]["kappa_quadratic"]
    assert k(grade_from_expected(low)) < 0.95
    cuts = choose_grade_cutpoints(true, low)
    assert k(grade_from_expected(low, cuts)) == pytest.approx(1.0)
    assert all(g - 1 - 0.65 < c < g - 0.55 for g, c in zip((2, 3, 4, 5), cuts, strict=True))
    assert choose_grade_cutpoints(true, true.astype(float)) == ROUNDING_CUTPOINTS  # nothing to gain: rounding
    with pytest.raises(ValueError):
        choose_grade_cutpoints(true, low[:-1])


def test_tune_chooses_cutpoints_before_the_rescan_threshold():
    true = np.array([1, 2, 3, 4, 4, 5, 2, 3])
    expected = np.array([1.1, 1.6, 2.6, 3.4, 3.45, 4.3, 1.7, 2.7])  # reads 0.5 low: rounding misses grade 4s
    probs = np.zeros((true.size, 5))
    for i, e in enumerate(expected):  # a two-point distribution with this expected grade
        lo = int(np.floor(e))
        probs[i, lo - 1], probs[i, min(lo, 4)] = (lo + 1 - e, e - lo) if lo < 5 else (1.0, 0.0)
    assert np.allclose(probs @ np.arange(1, 6), expected)
    res = MotionEvalResult(metrics={}, y_true=true - 1, y_prob=probs, true_grade=true,
                           pred_grade=grade_from_expected(expected), motion_ssd=np.full(true.size, np.nan))
    cfg = MotionConfig(aggregation="expected", tune_grade_cutpoints=True, rescan_target_sensitivity=1.0)
    tuned, note = ADAPTER.tune(res, cfg)
    assert tuned.grade_cutpoints is not None and tuned.grade_cutpoints != ROUNDING_CUTPOINTS
    assert (grade_from_expected(expected, tuned.grade_cutpoints) == true).all()
    assert "cut points" in note and "-> 1.000" in note
    # the tuned grades already catch every grade >= 4, so no P(grade >= 4) operating point is needed
    assert tuned.rescan_threshold is None and "grade rule alone" in note
    untuned, _ = ADAPTER.tune(res, cfg.model_copy(update={"tune_grade_cutpoints": False}))
    assert untuned.grade_cutpoints is None and untuned.rescan_threshold is not None


def test_loss_weights_rare_grades_and_respects_config():
    cfg = MotionConfig()
    ADAPTER.build_model(cfg.model_copy(update={"channels": (4, 4, 4, 4, 4), "hidden": 4}))
    crit = ADAPTER._criterion
    w = crit.class_weight
    assert w[4] > w[3] > w[0]  # grade 5 (10 scans in the thesis) weighs most
    logits = torch.zeros(2, 5, requires_grad=True)
    loss = ADAPTER.loss(logits, {"label": torch.tensor([0, 4])})
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None
    ADAPTER.build_model(MotionConfig(channels=(4, 4, 4, 4, 4), hidden=4, loss="cross_entropy",
                                     class_weight_scheme="none"))
    plain = ADAPTER.loss(torch.zeros(2, 5), {"label": torch.tensor([0, 4])})
    assert float(plain) == pytest.approx(float(np.log(5)), rel=1e-5)


# --- pre-processing on both geometries ---------------------------------------------------------------


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_preprocess_record_takes_8_slices_of_both_geometries(tmp_path, geometry):
    from training.data import records_from_rows

    row = write_scan(tmp_path, geometry=geometry, grade=3, seed=5)
    (rec,) = records_from_rows([row], tmp_path)
    samples = ADAPTER.preprocessor(MotionConfig())(rec)
    assert len(samples) == 8
    assert all(s["image"].shape == (1, 256, 256) and s["image"].dtype == np.float32 for s in samples)
    assert {s["label"] for s in samples} == {2}
    assert [s["slice"] for s in samples] == list(range(8))
    assert all(np.isfinite(s["motion_ssd"]) for s in samples)
    # density normalised: soft tissue/bone contrast survives, values are z-scores
    img = samples[3]["image"]
    assert -2.0 < float(img.min()) < 0.0 < 2.0 < float(img.max()) < 6.0


def test_routing_sends_hrpqct_here_and_lumbar_ct_elsewhere(tmp_path):
    from dicomnode.config import load_config
    from dicomnode.router import SeriesInfo, route_series

    cfg = load_config(Path(__file__).resolve().parents[2] / "config" / "node.yaml")

    def routed(folder: Path) -> list[str]:
        dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.rglob("*.dcm"))]
        return [r.task for r in route_series(SeriesInfo.from_datasets(dss), cfg.routes)]

    write_scan(tmp_path / "xct", geometry="XtremeCT", patient_id="A", body_part="RADIUS")
    write_scan(tmp_path / "xct2", geometry="XtremeCT II", patient_id="B", body_part="SCHIENBEIN")
    write_scan(tmp_path / "lumbar", geometry="XtremeCT", patient_id="C", body_part="LSPINE",
               manufacturer="SIEMENS", model="SOMATOM Force")
    write_scan(tmp_path / "wholebody", geometry="XtremeCT", patient_id="D", body_part="RADIUS",
               manufacturer="SIEMENS", model="SOMATOM Force")
    assert routed(tmp_path / "xct") == ["hrpqct_motion"]
    assert routed(tmp_path / "xct2") == ["hrpqct_motion"]
    assert "hrpqct_motion" not in routed(tmp_path / "lumbar")
    assert routed(tmp_path / "lumbar") == ["spine_bmd"]
    assert routed(tmp_path / "wholebody") == []  # a radius CT, but not from an HR-pQCT scanner


# --- tiny bundle: train -> evaluate -> analyze ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A few synthetic scans of both geometries, a tiny bundle trained for a few steps, its evaluation."""
    from training.cli import main

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("hrpqct")
    data = root / "data"
    rows = []
    for i in range(8):
        geometry = "XtremeCT" if i % 2 == 0 else "XtremeCT II"
        rows.append(write_scan(data, geometry=geometry, grade=i % 5 + 1, seed=100 + i, patient_id=f"PT{i:02d}",
                               body_part="RADIUS" if i % 3 else "TIBIA"))
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    bundle = root / "bundle"
    rc = main(["train", "hrpqct_motion", "--data", str(data), "--out", str(bundle), "--epochs", "1", "--device",
               "cpu", "--version", "tiny1", "--set", f"task.channels={TINY['channels']}", "--set",
               f"task.hidden={TINY['hidden']}", "--set", "train.batch_size=8", "--set",
               "train.max_steps_per_epoch=3"])
    assert rc == 0
    ev = root / "eval"
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(ev), "--device", "cpu"]) == 0
    return {"data": data, "bundle": bundle, "eval": ev, "root": root}


def test_tiny_bundle_records_preprocessing_and_task_config(tiny):
    meta = json.loads((tiny["bundle"] / "bundle.json").read_text())
    assert meta["task"] == "hrpqct_motion" and meta["architecture"] == "motion_cnn"
    assert meta["init_args"]["num_classes"] == 5 and meta["init_args"]["channels"] == TINY["channels"]
    assert meta["input"]["size"] == [256, 256]
    assert meta["input"]["extra"]["slices"] == 8
    assert meta["input"]["extra"]["normalisation"] == {"low": -500.0, "high": 2500.0, "mean": 0.0, "std": 300.0}
    assert meta["task_config"]["aggregation"] == "argmax" and meta["task_config"]["rescan_min_grade"] == 4
    assert meta["synthetic_only"] is True
    assert [lab["code"]["value"] for lab in meta["labels"]] == [f"MOTION-GRADE-{g}" for g in range(1, 6)]
    assert "kappa_quadratic" in meta["metrics"]


def test_split_is_by_scan_and_patient_never_by_slice(tiny):
    from training.data import RecordDataset, load_records, split_records

    records = load_records(tiny["data"])
    split = split_records(records)
    parts = [split.train, split.val, split.holdout]
    assert all(parts) and sum(map(len, parts)) == len(records) == 8
    patients = [{r.patient_id for r in part} for part in parts]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    cfg = MotionConfig()
    ds = RecordDataset(split.train, ADAPTER.preprocessor(cfg), ADAPTER.preprocess_signature(cfg))
    assert len(ds) == 8 * len(split.train)
    for ri, rec in enumerate(split.train):  # the 8 slices of one scan are 8 samples of one record, one label
        items = [ds[i] for i, (r, _) in enumerate(ds.index) if r == ri]
        assert len(items) == 8 and {int(it["label"]) for it in items} == {grade_of(rec.row) - 1}


def test_evaluate_writes_motion_metrics_plot_and_reference(tiny):
    metrics = json.loads((tiny["eval"] / "metrics.json").read_text())
    m = metrics["metrics"]
    for key in ("accuracy", "macro_f1", "kappa_quadratic", "rescan_sensitivity", "rescan_specificity",
                "confusion_matrix", "motion_ssd_spearman_pred", "slice_accuracy"):
        assert key in m
    assert np.asarray(m["confusion_matrix"]).shape == (5, 5)
    assert np.asarray(m["confusion_matrix"]).sum() == metrics["n_records"] == m["n"]
    assert m["n_slices"] == 8 * m["n"]
    assert metrics["reference"]["label_distribution"]["tibia"] == [334, 97, 42, 24, 2]
    assert (tiny["eval"] / "motion_ssd_vs_grade.png").stat().st_size > 1000
    report = (tiny["eval"] / "report.md").read_text()
    assert "motion_ssd_vs_grade.png" in report and "operator_full_agreement" in report


def _content_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    (doc,) = [report]
    items = doc.ContentSequence
    (imgs,) = [it for it in items if it.ConceptNameCodeSequence[0].CodeValue == "126010"]
    # the scan's conclusion, placed on one slice too, is checked by tests/unit/test_results_sr.py
    return [g for g in imgs.ContentSequence
            if not any(str(i.get("TextValue", "")).endswith(" conclusion") for i in g.ContentSequence)]


def _sr_groups(sr: pydicom.Dataset) -> list[dict[str, Any]]:
    """[scan, 8 slices, rescan]: each slice is a TID 1410 group outlining its image; the scan's grade and its rescan
    recommendation (about all 8 slices) are conclusions in the document-level "Qualitative Evaluations"."""
    slices = [_group_info(g) for g in _content_groups(sr)]
    (container,) = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    scan_level: list[dict[str, Any]] = []
    for it in container.ContentSequence:
        name = it.ConceptNameCodeSequence[0].CodeMeaning
        if it.ValueType == "CODE":
            scan_level.append({"images": [], "num": {}, "qual": (name, it.ConceptCodeSequence[0].CodeValue),
                               "tracking": None, "n_images": 0})
        elif name != "Summary":
            text, info = str(it.TextValue), scan_level[-1]
            m = re.search(r"probability ([0-9.e+-]+) % over (\d+) images$", text)
            if m:
                info["num"][(name, "%")] = float(m.group(1))
                info["n_images"] = int(m.group(2))
            else:  # "<value> <UCUM unit>"
                value, unit = text.split()
                info["num"][(name, unit)] = float(value)
    return [scan_level[0], *slices, scan_level[1]]


def _group_info(group: pydicom.Dataset) -> dict[str, Any]:
    info: dict[str, Any] = {"images": [], "num": {}, "qual": None, "tracking": None}
    for it in group.ContentSequence:
        name = it.ConceptNameCodeSequence[0].CodeMeaning
        if it.ValueType == "TEXT" and name == "Tracking Identifier":
            info["tracking"] = it.TextValue
        elif it.ValueType == "IMAGE":
            info["images"].append(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif it.ValueType == "SCOORD":  # TID 1410: the image region names its image
            info["images"].append(it.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif it.ValueType == "NUM":
            mv = it.MeasuredValueSequence[0]
            key = (name, mv.MeasurementUnitsCodeSequence[0].CodeValue)
            assert key not in info["num"], f"duplicate measurement {key}"
            info["num"][key] = float(mv.NumericValue)
        elif it.ValueType == "CODE" and name != "Finding Site" and name != "Finding":
            info["qual"] = (name, it.ConceptCodeSequence[0].CodeValue)
    return info


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_analyze_writes_sr_and_montage_for_both_geometries(tiny, tmp_path, geometry, dciodvfy):
    from dicomnode.analyze import analyze

    study = tmp_path / "study"
    row = write_scan(study, geometry=geometry, grade=4, seed=7, patient_id="NEW1", body_part="TIBIA")
    out = tmp_path / "out"
    written = analyze(study, "hrpqct_motion", out, model_dir=tiny["bundle"], device="cpu")
    by_mod = {pydicom.dcmread(p).Modality: p for p in written}
    assert len(written) == 2 and set(by_mod) == {"SR", "OT"}  # the SR and one secondary-capture montage
    for p in written:
        dciodvfy(p)
    sr = pydicom.dcmread(by_mod["SR"])
    assert sr.StudyInstanceUID == row["study_uid"]
    groups = _sr_groups(sr)
    assert len(groups) == 1 + 8 + 1
    sources = sorted((f for f in study.rglob("*.dcm")), key=lambda f: pydicom.dcmread(f, stop_before_pixels=True)
                     .InstanceNumber)
    uids = [pydicom.dcmread(sources[i], stop_before_pixels=True).SOPInstanceUID
            for i in select_slices(GEOMETRIES[geometry]["slices"])]
    scan, slices, rescan = groups[0], groups[1:9], groups[9]
    assert scan["qual"][0] == "Motion artifact grade" and scan["qual"][1].startswith("MOTION-GRADE-")
    grade = int(scan["qual"][1][-1])
    assert scan["num"][("Motion artifact score", "{grade}")] == grade
    assert 1.0 <= scan["num"][("Expected motion artifact grade", "{grade}")] <= 5.0
    assert 0.0 < scan["num"][("Motion artifact grade", "%")] <= 100.0
    assert scan["n_images"] == len(uids) == 8
    assert [s["images"] for s in slices] == [[u] for u in uids]
    assert all(1 <= s["num"][("Motion artifact score", "{grade}")] <= 5 for s in slices)
    assert all(0 < s["num"][("Motion artifact grade", "%")] <= 100 for s in slices)
    assert rescan["qual"] == ("Rescan recommended", codes.YES.value if grade >= 4 else codes.NO.value)
    assert 0.0 <= rescan["num"][("Rescan recommended", "%")] <= 100.0
    sc = pydicom.dcmread(by_mod["OT"])
    assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == row["study_uid"]
    assert [s.ReferencedSOPInstanceUID for s in sc.SourceImageSequence] == uids


def test_too_short_series_is_refused_clearly(tiny, tmp_path):
    from dicomnode.errors import DicomNodeError
    from inference.tasks import TaskContext, get_task

    study = tmp_path / "s"
    write_scan(study, geometry="XtremeCT", grade=1, seed=3)
    dss = [pydicom.dcmread(f) for f in sorted(study.rglob("*.dcm"))][:5]  # too few slices to grade
    with pytest.raises(DicomNodeError, match="at least 8 slices"):
        get_task("hrpqct_motion")(dss, TaskContext(model_dir=tiny["bundle"], device="cpu"))


class _EditedBundle:
    """A copy of the tiny bundle whose ``task_config`` a test edits, and one scan analysed with it by the node."""

    def __init__(self, tiny: dict[str, Path], tmp_path: Path, **scan: Any) -> None:
        import shutil

        self.root, self.bundle, self.study = tmp_path, tmp_path / "bundle", tmp_path / "study"
        shutil.copytree(tiny["bundle"], self.bundle)
        self.meta = json.loads((self.bundle / "bundle.json").read_text())
        write_scan(self.study, geometry="XtremeCT", **scan)
        self.runs = 0

    def analyze(self, **task_config: Any) -> list[Path]:
        """The node's output files with ``task_config`` updated (written into bundle.json first)."""
        from dicomnode.analyze import analyze

        self.meta["task_config"].update(task_config)
        (self.bundle / "bundle.json").write_text(json.dumps(self.meta))
        self.runs += 1
        return analyze(self.study, "hrpqct_motion", self.root / f"out{self.runs}", model_dir=self.bundle, device="cpu")

    def sr_groups(self, **task_config: Any) -> list[dict[str, Any]]:
        """The content groups of the SR written with ``task_config``."""
        sr = next(pydicom.dcmread(p) for p in self.analyze(**task_config) if pydicom.dcmread(p).Modality == "SR")
        return _sr_groups(sr)


def test_node_applies_the_bundles_rescan_operating_point(tiny, tmp_path):
    edited = _EditedBundle(tiny, tmp_path, grade=1, seed=5, patient_id="OP1", body_part="RADIUS")

    def rescan_finding(threshold: float | None) -> tuple[str, int, float]:
        groups = edited.sr_groups(rescan_threshold=threshold)
        return (groups[-1]["qual"][1], int(groups[0]["qual"][1][-1]),
                groups[-1]["num"][("Rescan recommended", "%")] / 100.0)

    answer, grade, p_rescan = rescan_finding(None)
    assert answer == (codes.YES.value if grade >= 4 else codes.NO.value)
    below = rescan_finding(max(p_rescan * 0.5, 1e-6))  # P(grade >= 4) reaches the operating point
    assert below[0] == codes.YES.value and below[2] == pytest.approx(p_rescan)
    if grade < 4 and p_rescan < 0.999:
        assert rescan_finding(min(p_rescan * 1.01 + 1e-4, 0.9999))[0] == codes.NO.value


def test_node_applies_the_bundles_grade_cutpoints(tiny, tmp_path):
    edited = _EditedBundle(tiny, tmp_path, grade=2, seed=6, patient_id="CP1", body_part="TIBIA")

    def scan_grade(cutpoints: tuple[float, ...] | None) -> int:
        return int(edited.sr_groups(aggregation="expected", grade_cutpoints=cutpoints)[0]["qual"][1][-1])

    assert scan_grade((1.001, 1.002, 1.003, 1.004)) == 5  # every expected grade above 1.004
    assert scan_grade((4.996, 4.997, 4.998, 4.999)) == 1  # no expected grade of a softmax mix reaches 4.996
    with pytest.raises(BundleError, match="cut points"):
        edited.analyze(grade_cutpoints=[3.0, 2.0, 4.0, 4.5])


def test_retune_writes_new_operating_points_with_the_same_weights(tiny, tmp_path):
    import shutil

    from inference.bundle import load_bundle
    from training.cli import main
    from training.retune import retune_bundle
    from training.trainer import TrainError

    out = tmp_path / "retuned"
    assert main(["retune", str(tiny["bundle"]), "--data", str(tiny["data"]), "--out", str(out), "--set",
                 "task.rescan_target_sensitivity=1.0", "--device", "cpu"]) == 0
    src, new = load_bundle(tiny["bundle"]), load_bundle(out)
    assert new.meta.version == "tiny1-retuned" and new.meta.task_config["rescan_target_sensitivity"] == 1.0
    assert src.meta.task_config["rescan_target_sensitivity"] is None
    assert f"re-tuned from bundle tiny1 (weights sha256 {src.meta.weights_sha256})" in new.meta.notes
    assert "rescan_target_sensitivity=1.0" in new.meta.notes
    assert new.state_dict.keys() == src.state_dict.keys()
    assert all(torch.equal(new.state_dict[k], src.state_dict[k]) for k in src.state_dict)
    assert new.meta.training_data_hash == src.meta.training_data_hash and "kappa_quadratic" in new.meta.metrics
    assert new.meta.created_at >= src.meta.created_at and new.meta.code == src.meta.code  # new bundle, same training
    # only operating points may change, and only on the bundle's own training data
    with pytest.raises(TrainError, match="operating points"):
        retune_bundle(tiny["bundle"], tiny["data"], tmp_path / "x", {"hidden": 4}, device="cpu")
    other = tmp_path / "other"
    shutil.copytree(tiny["data"], other)
    rows = (other / "labels.jsonl").read_text().splitlines()
    (other / "labels.jsonl").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(TrainError, match="not the training data"):
        retune_bundle(tiny["bundle"], other, tmp_path / "y", {"rescan_target_sensitivity": 0.9}, device="cpu")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
