"""wrist_fracture end to end: post-processing rules, pre-processing through the task's code path, a tiny
trained bundle through ``dicomnode-train train/evaluate`` and ``dicomnode analyze`` (SR + one SC per image)."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicomnode.analyze import analyze
from dicomnode.results import codes as rc
from inference.codes import BILATERAL, LEFT, RIGHT, WRIST
from inference.errors import TaskError
from inference.findings import ABSENT, FRACTURE, PRESENT, counted, decision_text, statement
from inference.radiograph import MEAN, STD
from inference.tasks import TaskContext, get_task
from inference.tasks.wrist_fracture import (
    image_laterality,
    image_statement,
    study_laterality,
    study_probability,
)
from tests.plugins.bone_test_task import dx_dataset
from training.cli import main as train_main
from training.data import Record
from training.tasks import get_adapter
from training.tasks.wrist_fracture import augment_tensor, image_label, prepare_record, study_metrics

TINY = ["--set", "input_hw=[96,64]", "--set", "stages=3", "--set", "batch_size=8", "--set", "n_boot=50",
        "--set", "max_steps_per_epoch=3"]


# --------------------------------------------------------------------------- rules


def test_decision_text_states_the_operating_point() -> None:
    assert decision_text(0.73, 0.81, "fracture suspected", "no fracture detected") == \
        "p=0.73 < 0.81: no fracture detected"
    assert decision_text(0.92, 0.81, "fracture suspected", "no fracture detected") == \
        "p=0.92 >= 0.81: fracture suspected"
    assert decision_text(0.81, 0.81, "yes", "no") == "p=0.81 >= 0.81: yes"  # at the threshold is positive
    # never "p=0.81 < 0.81": more digits when the rounded values would read equal
    assert decision_text(0.8096, 0.81, "yes", "no") == "p=0.8096 < 0.8100: no"
    assert decision_text(0.12, 0.4, "yes", "no", name="P(grade>=4)") == "P(grade>=4)=0.12 < 0.40: no"
    assert image_statement(0.3, 0.5) == "p=0.30 < 0.50: no fracture detected"
    assert statement("a", "", " b ") == "a; b"
    assert (counted(1, "image"), counted(0, "region"), counted(3, "region")) == ("1 image", "0 regions", "3 regions")


def test_study_probability_alo_and_majority() -> None:
    assert study_probability([0.1, 0.7]) == pytest.approx(0.7)  # at least one
    assert study_probability([0.1, 0.7], "majority", 0.5) == pytest.approx(0.5)
    assert study_probability([0.6, 0.7, 0.2], "majority", 0.5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        study_probability([])
    with pytest.raises(ValueError):
        study_probability([0.2], "mean")


def test_laterality_from_image_then_series_tag() -> None:
    ds = pydicom.Dataset()
    assert image_laterality(ds) is None
    ds.Laterality = "L"
    assert image_laterality(ds) == LEFT
    ds.ImageLaterality = "R"  # the image's own tag wins
    assert image_laterality(ds) == RIGHT
    assert study_laterality([LEFT, LEFT, None]) == LEFT
    assert study_laterality([LEFT, RIGHT]) == BILATERAL
    assert study_laterality([None, None]) is None


def test_image_label_from_study_or_boxes() -> None:
    row = {"label": 1, "boxes": [{"sop_instance_uid": "1.2.3", "x0": 1, "y0": 1, "x1": 2, "y1": 2}]}
    assert image_label(row, "1.2.4", "study") == 1
    assert image_label(row, "1.2.3", "boxes") == 1
    assert image_label(row, "1.2.4", "boxes") == 0
    assert image_label({"label": 0, "boxes": row["boxes"]}, "1.2.3", "boxes") == 0


def test_study_metrics_alo_majority_and_image_level() -> None:
    # study 0 (neg): images 0.2 / 0.1; study 1 (pos): 0.9 / 0.3; study 2 (pos): parts 0.4 + 0.6 on image 0, 0.7
    prob = np.array([0.2, 0.1, 0.9, 0.3, 0.4, 0.6, 0.7])
    label = np.array([0, 0, 1, 1, 1, 1, 1])
    record = np.array([0, 0, 1, 1, 2, 2, 2])
    image = np.array([0, 1, 0, 1, 0, 0, 1])
    m, y, p = study_metrics(prob, label, record, image, threshold=0.5, n_boot=20)
    assert m["n_studies"] == 3 and m["n_images"] == 6 and m["n_parts"] == 7
    assert list(y) == [0, 1, 1] and list(p) == pytest.approx([0.2, 0.9, 0.7])
    assert m["study_accuracy_alo"] == 1.0 and m["study_auc"] == 1.0
    # majority: study 1 has 1 of 2 images positive -> not more than half -> negative
    assert m["study_accuracy_majority"] == pytest.approx(2 / 3)
    assert m["study_sensitivity_majority"] == pytest.approx(0.5)
    # images: [0.2, 0.1, 0.9, 0.3, 0.6 (max of parts), 0.7] vs [0, 0, 1, 1, 1, 1] -> 5/6
    assert m["image_accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[1, 0], [0, 2]]


def test_augmentation_crops_flips_and_never_inverts() -> None:
    torch.manual_seed(0)
    img = torch.zeros(1, 60, 40)
    img[:, 10:50, 5:15] = 2.0  # bright bar on the left
    flips = 0
    for _ in range(40):
        out = augment_tensor({"image": img.half(), "label": torch.tensor(1)})["image"]
        assert out.shape == img.shape and out.dtype == torch.float32
        assert float(out.max()) <= 2.0 + 1e-4 and float(out.min()) >= -1e-4  # no inversion
        left, right = float(out[..., :20].sum()), float(out[..., 20:].sum())
        flips += right > left
    assert 8 <= flips <= 32  # p = 0.5


# --------------------------------------------------------------------------- pre-processing via the task's code


def _two_arm_dicom(tmp: Path, photometric: str = "MONOCHROME2") -> Record:
    rows, cols = 200, 240
    arr = np.zeros((rows, cols), np.float64)
    yy, xx = np.mgrid[0:rows, 0:cols]
    for cx in (60, 180):  # two forearms, wide end (hand) up
        half = 12 + 14 * (rows - yy) / rows
        arr[(np.abs(xx - cx) < half) & (yy > 20) & (yy < 185)] = 3000
    arr[5:10, 5:10] = 4000  # marker: below the minimum share, dropped
    stored = (4095 - arr if photometric == "MONOCHROME1" else arr).astype(np.uint16)
    ds = dx_dataset("1.2.3.4", "1.2.3.4.1", 1, rows=rows, cols=cols)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    for kw in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTSequence"):
        if kw in ds:
            delattr(ds, kw)
    path = tmp / f"{photometric}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Record(key="1.2.3.4", patient_id="P", study_uid="1.2.3.4", files=(path,), row={"label": 1})


def test_prepare_record_splits_parts_and_inverts_from_header(tmp_path: Path) -> None:
    kw = dict(input_hw=(96, 64), mean=MEAN, std=STD, split=True, min_share=0.02, align=True, image_labels="study")
    m2 = prepare_record(_two_arm_dicom(tmp_path, "MONOCHROME2"), **kw)
    m1 = prepare_record(_two_arm_dicom(tmp_path, "MONOCHROME1"), **kw)
    assert len(m2) == 2 and len(m1) == 2  # two arms, the marker dropped
    for a, b in zip(m2, m1, strict=True):
        assert a["image"].shape == (1, 96, 64) and a["image"].dtype == np.float16
        assert int(a["label"]) == 1 and int(a["image_index"]) == 0
        np.testing.assert_allclose(a["image"].astype(np.float32), b["image"].astype(np.float32), atol=0.05)
        img = a["image"][0].astype(np.float32) * STD + MEAN
        rows = np.nonzero((img > 0.5).any(axis=1))[0]
        top, bottom = img[rows[0]:rows[0] + 10], img[rows[-1] - 9:rows[-1] + 1]
        assert (top > 0.5).sum() > (bottom > 0.5).sum()  # wide end (hand) up


# --------------------------------------------------------------------------- tiny bundle end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("wrist")
    data = root / "data"
    assert train_main(["synth", "wrist_fracture", "--out", str(data), "--n", "10", "--seed", "1",
                       "--workers", "1"]) == 0
    bundle = root / "bundle"
    assert train_main(["train", "wrist_fracture", "--data", str(data), "--out", str(bundle), "--epochs", "2",
                       "--device", "cpu", "--version", "t1", "--fp16", "--synthetic", *TINY]) == 0
    return {"data": data, "bundle": bundle, "root": root}


def test_bundle_records_faithful_training_defaults(trained: dict[str, Path]) -> None:
    meta = json.loads((trained["bundle"] / "bundle.json").read_text())
    assert meta["task"] == "wrist_fracture" and meta["architecture"] == "resnet_classifier"
    assert meta["init_args"] == {"backbone": "resnet18", "in_channels": 1, "num_outputs": 1, "stages": 3}
    assert meta["train_config"]["balanced_sampling"] is True and meta["train_config"]["optimizer"] == "adam"
    assert meta["primary_metric"] == "study_accuracy_alo"
    assert meta["synthetic_only"] is True and meta["weights_dtype"] == "float16"
    for key in ("study_accuracy_alo", "study_accuracy_majority", "image_accuracy", "study_auc", "confusion_matrix"):
        assert key in meta["metrics"]
    assert "synthetic" in (trained["bundle"] / "card.md").read_text().lower()


def test_faithful_config_is_the_default() -> None:
    adapter = get_adapter("wrist_fracture")
    cfg = adapter.config_model()
    assert cfg.input_hw == (512, 341) and cfg.backbone == "resnet18" and cfg.stages == 4
    assert (cfg.mean, cfg.std) == (0.34587, 0.22898) and cfg.crop_area == (0.9, 1.0) and cfg.hflip_p == 0.5
    assert adapter.train_config_defaults["batch_size"] == 32 and adapter.train_config_defaults["balanced_sampling"]


def test_evaluate_writes_report_with_reference_figures(trained: dict[str, Path]) -> None:
    out = trained["root"] / "eval"
    assert train_main(["evaluate", str(trained["bundle"]), "--data", str(trained["data"]), "--out", str(out),
                       "--device", "cpu", "--baseline"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"]["study_accuracy_alo"] == 0.85
    # the histogram baseline, fitted outside the hold-out and scored on the same hold-out studies
    base = metrics["baseline"]
    assert base["protocol"].startswith("fitted on the patients outside the hold-out")
    assert base["n"] == metrics["n_records"] and base["n_fitted"] == 10 - base["n"] and "auc" in base
    assert "## Non-deep baseline" in (out / "report.md").read_text()
    assert len(metrics["metrics"]["study_auc_ci95"]) == 2
    report = (out / "report.md").read_text()
    assert "| study_accuracy_alo |" in report and "| 0.85 |" in report
    assert (out / "confusion_matrix.png").exists()


def test_evaluate_all_records_cross_validates_the_baseline(trained: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from training import baseline
    from training.evaluate import evaluate_bundle, write_report

    ev = evaluate_bundle(trained["bundle"], trained["data"], None, subset="all", device="cpu", baseline=True)
    assert ev.baseline is not None and ev.baseline["protocol"] == "5-fold cross-validation grouped by patient"
    assert ev.baseline["n"] == ev.n_records == 10
    # fitted on another folder (a recipe's training data), scored on every evaluated study
    assert train_main(["synth", "wrist_fracture", "--out", str(trained["root"] / "fit"), "--n", "8", "--seed", "9",
                       "--workers", "1"]) == 0
    ev = evaluate_bundle(trained["bundle"], trained["data"], None, subset="all", device="cpu", baseline=True,
                         baseline_fit_dir=trained["root"] / "fit")
    assert ev.baseline is not None and ev.baseline["n_fitted"] == 8 and ev.baseline["n"] == 10
    assert ev.baseline["protocol"] == "fitted on 8 units of fit, scored on every unit"
    # a baseline that cannot be scored leaves the model's evaluation standing, with the reason in the report
    def refuse(*_a: object, **_k: object) -> None:
        raise baseline.BaselineError("every study has the same label: nothing to separate")

    monkeypatch.setattr(baseline, "run_baseline", refuse)
    ev = evaluate_bundle(trained["bundle"], trained["data"], None, subset="all", device="cpu", baseline=True)
    assert ev.baseline == {"error": "every study has the same label: nothing to separate"} and ev.n_records == 10
    out = trained["root"] / "eval-refused"
    write_report(ev, out, {})
    assert "Not scored: every study has the same label" in (out / "report.md").read_text()


def _study_dir(data: Path, n_images: int = 2) -> Path:
    for row in map(json.loads, (data / "labels.jsonl").read_text().splitlines()):
        d = data / row["study_uid"]
        if len(list(d.rglob("*.dcm"))) == n_images:
            return d
    raise AssertionError("no 2-image study in the synthetic set")


def test_analyze_writes_sr_and_one_sc_per_image(trained: dict[str, Path], tmp_path: Path, dciodvfy) -> None:
    study = _study_dir(trained["data"])
    sources = sorted(study.rglob("*.dcm"))
    src = [pydicom.dcmread(p) for p in sources]
    written = analyze(study, "wrist_fracture", tmp_path, model_dir=trained["bundle"], device="cpu")
    srs = [p for p in written if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
    scs = [p for p in written if pydicom.dcmread(p, stop_before_pixels=True).Modality != "SR"]
    assert len(srs) == 1 and len(scs) == 2
    for p in written:
        dciodvfy(p)
    sr = hd.sr.srread(srs[0])
    assert "t1" in str(sr.ContentSequence)  # algorithm version in the report
    report = sr.content
    groups = [g for g in report.get_planar_roi_measurement_groups() if not str(g.tracking_identifier).endswith(" conclusion")]
    assert len(groups) == 2  # one per image (each outlines its image); the study finding is a conclusion
    for ds in src:
        (g,) = [g for g in report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=str(ds.SOPInstanceUID))
                if not str(g.tracking_identifier).endswith(" conclusion")]
        (prob,) = g.get_measurements(name=rc.to_hd(FRACTURE))
        assert 0.0 <= prob.value <= 100.0  # %
        site = g.finding_sites[0]
        assert site.value == rc.to_hd(WRIST)
        assert site.laterality == rc.to_hd({"L": LEFT, "R": RIGHT}[str(ds.ImageLaterality)])
    for p in scs:
        sc = pydicom.dcmread(p)
        assert sc.StudyInstanceUID == src[0].StudyInstanceUID
        ref = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref in {str(d.SOPInstanceUID) for d in src}


def test_task_findings_heatmaps_in_source_pixels(trained: dict[str, Path]) -> None:
    study = _study_dir(trained["data"])
    src = [pydicom.dcmread(p) for p in sorted(study.rglob("*.dcm"))]
    f = get_task("wrist_fracture")(src, TaskContext(model_dir=trained["bundle"], device="cpu"))
    study_c, *per_image = f.classifications
    assert study_c.images == () and study_c.finding == FRACTURE and study_c.finding_site == WRIST
    assert study_c.probability == pytest.approx(max(c.probability for c in per_image))  # at least one
    assert study_c.value == (PRESENT if study_c.probability >= 0.5 else ABSENT)
    assert {c.images[0].sop_instance_uid for c in per_image} == {str(d.SOPInstanceUID) for d in src}
    assert len(f.overlays) == len(src)
    for ov, c in zip(f.overlays, per_image, strict=True):
        panel = ov.panels[0]
        ds = next(d for d in src if str(d.SOPInstanceUID) == panel.image.sop_instance_uid)
        assert panel.heatmap.shape == (ds.Rows, ds.Columns)
        assert 0.0 <= float(panel.heatmap.min()) and float(panel.heatmap.max()) <= 1.0
        assert f"{c.probability:.2f}" in panel.caption
        assert image_statement(c.probability, 0.5) in panel.caption and c.threshold == 0.5
    # one statement: the study decision with its operating point, the same words the SR and the overlay show
    assert f.summary.startswith(image_statement(study_c.probability, 0.5))
    assert study_c.threshold == 0.5
    assert f.synthetic_model and f.algorithm_version == "t1"
    assert {"preprocess", "forward", "gradcam", "postprocess"} <= set(f.timings_s)
    # deterministic
    again = get_task("wrist_fracture")(src, TaskContext(model_dir=trained["bundle"], device="cpu"))
    assert again.classifications[0].probability == pytest.approx(study_c.probability, abs=1e-6)


def test_task_without_images_raises(trained: dict[str, Path]) -> None:
    ds = pydicom.Dataset()
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.Modality = "1.2.3", "1.2", "SR"
    with pytest.raises(TaskError):
        get_task("wrist_fracture")([ds], TaskContext(model_dir=trained["bundle"], device="cpu"))


def test_train_cli_uses_adapter_defaults_and_lets_the_user_override(tmp_path: Path) -> None:
    import argparse

    from training.train_cli import add_arguments, build_configs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    adapter = get_adapter("wrist_fracture")
    cfg, _ = build_configs(adapter, parser.parse_args(["wrist_fracture", "--data", "d", "--out", "o"]))
    assert cfg.batch_size == 32 and cfg.balanced_sampling and cfg.optimizer == "adam"
    yml = tmp_path / "c.yaml"
    yml.write_text("train: {batch_size: 4}\n")
    cfg, tcfg = build_configs(adapter, parser.parse_args(["wrist_fracture", "--data", "d", "--out", "o", "--config",
                                                          str(yml), "--set", "balanced_sampling=false",
                                                          "--set", "threshold=0.3"]))
    assert cfg.batch_size == 4 and not cfg.balanced_sampling and tcfg.threshold == 0.3
