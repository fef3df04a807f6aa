"""``dicomnode-train validate`` and ``finetune`` on a site's own export: a tiny wrist bundle trained on box labels
(promoted into a registry, as shipped), and a "hospital" folder of other studies whose labels come from a RIS
table keyed by accession number (study labels only, no boxes). Includes each failure case of the issue."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from inference.bundle import read_meta
from inference.registry import ModelRegistry
from training.cli import main as train_main
from training.data import Record, SplitConfig, load_records, split_records
from training.synth.manifest import read_manifest
from training.validate import ValidateError, check_labels, resolve_bundle
from training.validate_stats import Scores, subgroup_table, threshold_sweep, wilson

TINY = ["--set", "input_hw=[96,64]", "--set", "stages=3", "--set", "batch_size=8", "--set", "n_boot=20",
        "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("site")
    train_data = root / "phantoms"
    assert train_main(["synth", "wrist_fracture", "--out", str(train_data), "--n", "10", "--seed", "1",
                       "--workers", "1"]) == 0
    bundle = root / "t1"
    assert train_main(["train", "wrist_fracture", "--data", str(train_data), "--out", str(bundle), "--epochs", "1",
                       "--device", "cpu", "--version", "t1", "--synthetic", "--set", "image_labels=boxes",
                       *TINY]) == 0
    models = root / "models"
    ModelRegistry(models).promote("wrist_fracture", bundle)
    data = root / "hospital"
    assert train_main(["synth", "wrist_fracture", "--out", str(data), "--n", "10", "--seed", "5",
                       "--workers", "1"]) == 0
    truth = {r["study_uid"]: int(r["label"]) for r in read_manifest(data)}
    (data / "labels.jsonl").unlink()
    acc = {}
    for f in data.rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        acc[ds.StudyInstanceUID] = ds.AccessionNumber
    with open(root / "ris.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["AccessionNumber", "Finding"])
        w.writerows([acc[u], "fracture" if y else "no fracture"] for u, y in sorted(truth.items()))
    assert train_main(["import-labels", "--dicom", str(data), "--task", "wrist_fracture", "--table",
                       str(root / "ris.csv"), "--positive", "fracture", "--negative", "no fracture"]) == 0
    assert 0 < sum(truth.values()) < len(truth)
    return {"root": root, "models": models, "data": data, "train_data": train_data}


def test_validate_current_pointer_scores_every_study_on_study_labels(site: dict[str, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # run as a user would, from another folder, with relative paths
    (tmp_path / "models").symlink_to(site["models"])
    (tmp_path / "hospital").symlink_to(site["data"])
    assert train_main(["validate", "models/wrist_fracture/current", "--data", "hospital", "--device", "cpu",
                       "--n-boot", "100"]) == 0
    out = tmp_path / "validation-wrist_fracture-t1"
    v = json.loads((out / "validation.json").read_text())
    labels = [r["label"] for r in read_manifest(site["data"])]
    # every study scored, and the truth is the study label: not prevalence 0 from missing boxes
    assert v["manifest_rows"] == v["studies_scored"] == 10 and v["not_scored"] == []
    fig = v["figures"]
    assert fig["prevalence"] == pytest.approx(np.mean(labels)) and fig["positives"] == sum(labels) > 0
    assert any("scored on the study label" in n for n in v["notes"])
    assert fig["auc"]["value"] is not None and len(fig["auc"]["ci95"]) == 2
    (tn, fp), (fn, tp) = fig["confusion_matrix"]
    assert tp + fn == sum(labels) and tn + fp == 10 - sum(labels)
    assert fig["sensitivity"]["k"] == tp and fig["sensitivity"]["n"] == tp + fn
    lo, hi = fig["specificity"]["ci95"]
    assert lo <= fig["specificity"]["value"] <= hi
    for group in ("age band", "sex", "manufacturer", "body part", "view"):
        assert sum(r["n"] for r in v["subgroups"][group].values()) == 10
    base = v["baselines"]["histogram"]
    assert "auc" in base and base["protocol"].startswith("5-fold cross-validation") and base["n"] == 10
    report = (out / "report.md").read_text()
    assert report.count("\n| 0.") >= 19  # the threshold sweep, 0.05 .. 0.95
    for section in ("## Metrics with 95% confidence intervals", "## Calibration", "## Threshold sweep",
                    "## Subgroups", "## Simple baselines beside the network", "Every manifest row was scored."):
        assert section in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "confusion_matrix.png" in html and (out / "calibration.png").stat().st_size > 0
    assert "10 of 10 rows scored" in capsys.readouterr().out


def test_evaluate_refuses_box_truth_without_boxes_and_names_the_subset(site: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    current = str(site["models"] / "wrist_fracture" / "current")
    assert train_main(["evaluate", current, "--data", str(site["data"]), "--subset", "all", "--device", "cpu",
                       "--out", str(site["root"] / "ev")]) == 2
    out = capsys.readouterr().out
    assert "would count as negative" in out and "dicomnode-train validate" in out and len(out.splitlines()) == 1


def test_evaluate_says_it_scored_a_subset_of_a_foreign_folder(site: dict[str, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "hospital"
    shutil.copytree(site["data"], data)
    _edit_manifest(data, lambda r: {**r, "label": 0})  # no positives: the box refusal does not apply
    assert train_main(["evaluate", str(site["models"] / "wrist_fracture" / "current"), "--data", str(data),
                       "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    n = json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_records"]
    assert f"on {n} of 10 records (holdout)" in out and n < 10
    assert "not the bundle's hold-out" in out and "dicomnode-train validate BUNDLE --data DIR" in out


def test_bundle_names(site: dict[str, Path], tmp_path: Path) -> None:
    models, version_dir = site["models"], site["models"] / "wrist_fracture" / "t1"
    assert resolve_bundle(models / "wrist_fracture" / "current") == version_dir
    assert resolve_bundle(models / "wrist_fracture") == version_dir
    assert resolve_bundle("wrist_fracture", models) == version_dir
    assert resolve_bundle(version_dir) == version_dir
    with pytest.raises(ValidateError, match="--models-dir"):
        resolve_bundle("wrist_fracture")
    with pytest.raises(ValidateError, match="no model promoted for task 'spine_bmd'"):
        resolve_bundle("spine_bmd", models)


def _edit_manifest(data: Path, edit) -> None:  # noqa: ANN001
    rows = [edit(r) for r in read_manifest(data)]
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r is not None))


def test_failed_and_refused_studies_are_listed_not_dropped(site: dict[str, Path], tmp_path: Path) -> None:
    from training.validate import validate

    data = tmp_path / "hospital"
    shutil.copytree(site["data"], data)
    recs = sorted(load_records(data), key=lambda r: r.key)
    no_pixels, broken, unlabelled = recs[0], recs[1], recs[2]
    for f in no_pixels.files:  # images without pixel data
        ds = pydicom.dcmread(f)
        del ds.PixelData
        ds.save_as(f)
    ds = pydicom.dcmread(broken.files[0])  # pixel data cut short
    ds.PixelData = ds.PixelData[:100]
    pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
    try:
        ds.save_as(broken.files[0])
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    _edit_manifest(data, lambda r: {**r, "label": "maybe"} if r["study_uid"] == unlabelled.key else r)
    with open(data / "labels.jsonl", "a") as fh:
        fh.write(json.dumps({"study_uid": "1.2.3.4.5", "label": 1}) + "\n")
    v = validate(site["models"] / "wrist_fracture" / "current", data, tmp_path / "rep", device="cpu", n_boot=50,
                 baseline_train=site["train_data"])
    assert v.n_rows == 11 and len(v.scored) == 7
    # the histogram baseline fitted on the training folder, scored on the same 7 studies as the network
    assert v.baselines["histogram"]["n_fitted"] == 10 and v.baselines["histogram"]["n"] == 7
    why = {f.key: (f.stage, f.reason) for f in v.failures}
    assert why[no_pixels.key] == ("image", "no usable image (no pixel data)")
    assert why[broken.key][0] == "image"
    assert why[unlabelled.key] == ("labels", "label 'maybe' is not 0/1")
    assert why["1.2.3.4.5"][0] == "manifest" and "no DICOM file" in why["1.2.3.4.5"][1]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Not scored (failed or refused)" in report and all(k in report for k in why)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: {**r, "label": 0}, "are labelled negative (0): sensitivity, specificity and AUC need both classes"),
    (lambda r: {k: v for k, v in r.items() if k != "label"}, "has a 0/1 'label'"),
    (lambda r: None, "no manifest row"),
])
def test_refusals_give_one_line_reason_and_fix(site: dict[str, Path], tmp_path: Path, edit,  # noqa: ANN001
                                              message: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "hospital"
    shutil.copytree(site["data"], data)
    _edit_manifest(data, edit)
    if message == "no manifest row":
        (data / "labels.jsonl").write_text(json.dumps({"study_uid": "1.2.3.4.5", "label": 1}) + "\n")
    assert train_main(["validate", "wrist_fracture", "--models-dir", str(site["models"]), "--data", str(data),
                       "--device", "cpu", "--out", str(tmp_path / "rep")]) == 2
    out = capsys.readouterr().out
    assert message in out and out.startswith("error: ") and len(out.splitlines()) == 1
    assert not (tmp_path / "rep" / "report.md").exists()


def test_folder_without_manifest_points_to_import_labels(site: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert train_main(["validate", str(site["models"] / "wrist_fracture" / "current"), "--data", str(tmp_path),
                       "--device", "cpu"]) == 2
    out = capsys.readouterr().out
    assert "no labels manifest" in out and "dicomnode-train import-labels --dicom" in out


def test_spine_needs_per_level_classes() -> None:
    from training.tasks.spine_bmd import SpineBmdConfig

    rows = [{"study_uid": "1.2.3", "label": "osteopenia"}, {"study_uid": "1.2.4", "vertebrae": {"L1": "normal"}}]
    recs = [Record(key=r["study_uid"], patient_id=f"P{i}", study_uid=r["study_uid"], files=(), row=r)
            for i, r in enumerate(rows)]
    _, ok, refused, _ = check_labels("spine_bmd", SpineBmdConfig(), recs)
    assert [r.key for r in ok] == ["1.2.4"] and refused[0].key == "1.2.3" and "'vertebrae'" in refused[0].reason
    with pytest.raises(ValidateError, match="import-labels --dxa"):
        check_labels("spine_bmd", SpineBmdConfig(), recs[:1])


def test_stats_by_hand() -> None:
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634) and all(math.isnan(x) for x in wilson(0, 0))
    y = np.array([0, 0, 1, 1])
    rows = {r["threshold"]: r for r in threshold_sweep(y, np.array([0.1, 0.6, 0.4, 0.9]), [0.3, 0.5])}
    assert (rows[0.3]["tp"], rows[0.3]["fp"], rows[0.3]["tn"], rows[0.3]["fn"]) == (2, 1, 1, 0)
    assert (rows[0.5]["sensitivity"], rows[0.5]["specificity"]) == (0.5, 0.5)
    s = Scores("study", ["no", "yes"], y, np.array([0.1, 0.6, 0.4, 0.9]), np.array([0, 1, 0, 1]),
               np.arange(4), np.array(["a", "b", "c", "d"]), 0.5)
    t = subgroup_table(s, ["F", "M", "F", "M"])
    assert (t["F"]["sensitivity"], t["F"]["specificity"], t["F"]["auc"]) == (0.0, 1.0, 1.0)
    assert (t["M"]["sensitivity"], t["M"]["specificity"], t["M"]["n"], t["M"]["positives"]) == (1.0, 0.0, 2, 1)
    assert math.isnan(subgroup_table(s, ["F", "F", "M", "M"])["M"]["auc"])  # one class: no AUC


def test_finetune_locks_site_holdout_and_promotes_through_the_registry(site: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    shutil.copytree(site["models"], models)
    current = str(models / "wrist_fracture" / "current")
    common = ["--data", str(site["data"]), "--epochs", "1", "--device", "cpu", "--set", "max_steps_per_epoch=2",
              "--set", "n_boot=20"]
    assert train_main(["finetune", current, *common, "--version", "s1", "--out", str(tmp_path / "s1"),
                       "--margin", "-1"]) == 0
    assert (models / "wrist_fracture" / "current").read_text().strip() == "s1"
    meta = read_meta(tmp_path / "s1")
    assert "initialised from bundle wrist_fracture/t1" in meta.notes
    assert meta.task_config["image_labels"] == "study"  # study labels only: weak labels, not all-negative images
    cfg = SplitConfig.model_validate(meta.split["config"])
    assert cfg.salt == "site:site"
    split = split_records(load_records(site["data"]), cfg)
    assert split.holdout_hash == meta.holdout_hash and split.holdout
    assert not {r.patient_id for r in split.holdout} & {r.patient_id for r in split.train + split.val}
    assert "promoted: s1" in capsys.readouterr().out
    # a candidate that does not win on the site hold-out leaves the pointer where it was
    assert train_main(["finetune", current, *common, "--version", "s2", "--out", str(tmp_path / "s2"),
                       "--margin", "1.0"]) == 1
    assert (models / "wrist_fracture" / "current").read_text().strip() == "s1"
    assert "not promoted: s2" in capsys.readouterr().out
    # a bundle folder outside a registry: the registry to promote into must be named
    assert train_main(["finetune", str(tmp_path / "s1"), *common]) == 2
    assert "pass --models-dir" in capsys.readouterr().out
