"""physis_fracture: post-processing rules, label rules, the task with a scripted detector, and a tiny trained bundle."""

from __future__ import annotations

import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicomnode.results import ResultContext
from dicomnode.results import codes as rc
from dicomnode.results.builder import build_results
from inference import codes
from inference.findings import ABSENT, PRESENT
from inference.nets import build_network
from inference.nets.physis_two_stage import physis_init_args
from inference.registry import LoadedModel
from inference.tasks import TaskContext
from inference.tasks import physis_fracture as task_mod
from inference.tasks.physis_fracture_post import (
    BoxCandidate,
    PostConfig,
    combine,
    filter_detections,
    nms,
    reported_boxes,
    select_fracture_boxes,
)
from tests.plugins.bone_test_task import dx_dataset
from training.tasks.physis_samples import image_boxes, image_label

FX, METAL, TEXT = 1, 2, 3


# --------------------------------------------------------------------------- post-processing rules


def test_nms_keeps_best_of_overlapping_and_disjoint_boxes():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]
    keep = nms(boxes, [0.6, 0.9, 0.5], 0.5)
    assert keep.tolist() == [1, 2]
    assert nms(boxes, [0.6, 0.9, 0.5], 0.9).tolist() == [1, 0, 2]  # IoU 0.68 below a looser threshold


def test_filter_thresholds_and_per_class_nms():
    cfg = PostConfig(det_score_thresh=0.3, nms_iou=0.5)
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]
    labels = [FX, FX, METAL, FX, 0]
    scores = [0.8, 0.7, 0.9, 0.1, 0.99]
    b, lab, s = filter_detections(boxes, labels, scores, cfg)
    # the second fracture box is suppressed by the first; the metal box is another class; low score and
    # background label dropped
    assert lab.tolist() == [METAL, FX] and s.tolist() == [0.9, 0.8]
    np.testing.assert_allclose(b, [[0, 0, 10, 10], [0, 0, 10, 10]])


def test_metal_and_text_are_never_fracture_candidates():
    cfg = PostConfig(det_score_thresh=0.05)
    boxes = [[0, 0, 10, 10], [100, 100, 140, 120], [60, 60, 70, 70]]
    out = select_fracture_boxes(boxes, [METAL, TEXT, METAL], [0.99, 0.95, 0.9], cfg)
    assert out == []


def test_fracture_box_inside_stronger_distractor_is_dropped_weaker_kept():
    cfg = PostConfig(det_score_thresh=0.1, distractor_overlap=0.5)
    frac_in_metal = [12, 12, 18, 18]
    frac_free = [100, 100, 120, 120]
    metal = [10, 10, 30, 30]
    out = select_fracture_boxes([frac_in_metal, frac_free, metal], [FX, FX, METAL], [0.7, 0.6, 0.8], cfg)
    assert [c.box for c in out] == [tuple(map(float, frac_free))]
    # a weaker metal box does not suppress a stronger fracture box
    out = select_fracture_boxes([frac_in_metal, metal], [FX, TEXT], [0.9, 0.5], cfg)
    assert [c.det_score for c in out] == [0.9]


def test_top_k_keeps_highest_scores():
    cfg = PostConfig(det_score_thresh=0.1, top_k=2)
    boxes = [[i * 20, 0, i * 20 + 10, 10] for i in range(4)]
    out = select_fracture_boxes(boxes, [FX] * 4, [0.3, 0.9, 0.5, 0.7], cfg)
    assert [c.det_score for c in out] == [0.9, 0.7]


def test_combination_rule_geometric_mean_max_and_fallback():
    cands = [BoxCandidate((0, 0, 5, 5), 0.9, crop_prob=0.4), BoxCandidate((9, 9, 15, 15), 0.5, crop_prob=0.98)]
    res = combine(cands, 0.1, method="two_stage")
    assert res.score == pytest.approx(max(math.sqrt(0.36), math.sqrt(0.49)))
    assert res.boxes[0].crop_prob == 0.98  # sorted by combined score
    assert res.detector_score == 0.9 and res.image_prob == 0.1 and not res.used_fallback
    assert res.by_method() == {"two_stage": pytest.approx(0.7), "classifier": 0.1, "detector": 0.9}
    fb = combine([], 0.83, method="two_stage")
    assert fb.score == 0.83 and fb.used_fallback and fb.detector_score == 0.0
    assert combine(cands, None, method="detector").score == 0.9
    assert combine([], None, method="detector").score == 0.0
    assert combine([], 0.2, method="classifier").score == 0.2
    with pytest.raises(ValueError):
        combine([BoxCandidate((0, 0, 1, 1), 0.5)], 0.3, method="two_stage")  # crop probability missing
    with pytest.raises(ValueError):
        combine([], None, method="two_stage")


def test_reported_boxes_threshold():
    cfg = PostConfig(box_report_thresh=0.5)
    res = combine([BoxCandidate((0, 0, 5, 5), 0.9, crop_prob=0.9), BoxCandidate((9, 9, 15, 15), 0.3, crop_prob=0.3)],
                  0.2)
    assert [c.det_score for c in reported_boxes(res, cfg)] == [0.9]


def test_post_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        PostConfig.from_dict({"top_kk": 3})
    assert PostConfig.from_dict({"top_k": 5}).top_k == 5


# --------------------------------------------------------------------------- label rules


def test_image_labels_and_boxes_from_manifest_rows():
    inst = {"sop_instance_uid": "1.2", "label": 1, "boxes": [
        {"sop_instance_uid": "1.2", "x0": 1, "y0": 2, "x1": 5, "y1": 6, "label": "fracture"},
        {"sop_instance_uid": "1.2", "x0": 1, "y0": 2, "x1": 5, "y1": 6, "label": "axis"},
        {"sop_instance_uid": "1.2", "x0": 7, "y0": 2, "x1": 9, "y1": 6, "label": "metal"}]}
    assert image_label(inst, "1.2") == 1
    assert image_boxes(inst, "1.2") == [((1.0, 2.0, 5.0, 6.0), 1), ((7.0, 2.0, 9.0, 6.0), 2)]
    study = {"study_uid": "9", "label": "fracture", "boxes": [{"sop_instance_uid": "a", "x0": 0, "y0": 0, "x1": 4,
                                                               "y1": 4, "label": "fracture"}]}
    assert image_label(study, "a") == 1 and image_label(study, "b") == 0
    assert image_label({"study_uid": "9", "label": 1}, "b") == 1  # positive study without boxes
    assert image_label({"study_uid": "9", "label": 0, "image_labels": {"b": 1}}, "b") == 1


# --------------------------------------------------------------------------- task with a scripted detector


class ScriptedDetector(nn.Module):
    """Test double: returns fixed detections given in *detector input* pixels."""

    def __init__(self, boxes: list[list[float]], labels: list[int], scores: list[float]) -> None:
        super().__init__()
        self.out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64), "scores": torch.tensor(scores)}

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [dict(self.out) for _ in images]


class FixedLogit(nn.Module):
    """Test double: the same logit for every input."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.tensor([[math.log(prob / (1 - prob))]]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(x.shape[0], 1)


@pytest.fixture(scope="module")
def scripted_model() -> nn.Module:
    torch.set_num_threads(1)
    args = physis_init_args("two_stage", variant="light", det_long_side=64, image_size=32, crop_size=32)
    model = build_network("physis_two_stage", **args).eval()
    # source 200 x 160 -> detector square 64: scale 0.32, x padded by (64 - 51.2) / 2 = 6.4
    model.detector = ScriptedDetector(
        [[22.4, 16.0, 38.4, 32.0], [22.4, 16.0, 38.4, 32.0], [6.4, 0.0, 16.0, 6.4], [40.0, 40.0, 48.0, 48.0],
         [0.0, 10.0, 5.0, 20.0], [54.0, 50.0, 64.0, 70.0]],
        [FX, METAL, TEXT, FX, FX, FX], [0.9, 0.6, 0.99, 0.3, 0.95, 0.25])
    model.crop_classifier = FixedLogit(0.8)
    model.image_classifier = FixedLogit(0.1)
    return model


def test_scripted_detector_boxes_map_to_source_and_distractors_are_dropped(scripted_model):
    image = np.random.default_rng(0).random((200, 160)).astype(np.float32)
    res = task_mod.score_image(scripted_model, image, "cpu")
    # three fracture boxes; the metal and the text box never are, nor the one lying in the letterbox padding
    assert sorted(c.det_score for c in res.boxes) == pytest.approx([0.25, 0.3, 0.9])
    clipped = [c for c in res.boxes if c.det_score == 0.25]
    assert clipped and clipped[0].box[2] == pytest.approx(159.5) and clipped[0].box[3] == pytest.approx(199.5)
    top = res.boxes[0]
    # inverse letterbox: x = (x_det + 0.5 - pad_x) / 0.32 - 0.5, y = (y_det + 0.5) / 0.32 - 0.5
    np.testing.assert_allclose(top.box, (51.0625, 51.0625, 101.0625, 101.0625), atol=1e-5)
    assert top.score == pytest.approx(math.sqrt(0.9 * 0.8), abs=1e-5)
    assert res.score == pytest.approx(math.sqrt(0.9 * 0.8), abs=1e-5)
    assert res.image_prob == pytest.approx(0.1, abs=1e-5)


def test_task_findings_and_result_objects(scripted_model, monkeypatch, tmp_path, dciodvfy):
    study = "1.2.826.0.1.3680043.8.498.777"
    images = [dx_dataset(study, study + ".1", i, rows=200, cols=160) for i in range(2)]
    for ds in images:
        ds.PatientAge = "011Y"
    meta = type("Meta", (), {"algorithm_name": "bone-dicomnode/physis_fracture/physis_two_stage",
                             "version": "t1", "synthetic_only": True, "architecture": "physis_two_stage"})()
    loaded = LoadedModel(bundle=type("B", (), {"meta": meta})(), model=scripted_model, device=torch.device("cpu"))
    monkeypatch.setattr(task_mod, "model_for", lambda task, ctx: loaded)
    f = task_mod.run_physis_fracture(images, TaskContext())
    assert f.algorithm_version == "t1" and f.synthetic_model
    assert {"load", "preprocess", "forward", "postprocess"} <= set(f.timings_s)
    # study-level + one per image; only the fracture box with combined score >= 0.5 is reported per image
    assert len(f.classifications) == 3 and f.classifications[0].value == PRESENT
    assert len(f.boxes) == 2 and all(b.label == codes.GROWTH_PLATE_FRACTURE for b in f.boxes)
    assert {b.image.sop_instance_uid for b in f.boxes} == {str(d.SOPInstanceUID) for d in images}
    assert len(f.overlays) == 2 and all(len(o.panels[0].boxes) == 1 for o in f.overlays)

    objects = build_results(f, images, ResultContext())
    mods = sorted(o.Modality for o in objects)
    assert mods.count("SR") == 1 and len(mods) == 3
    for i, o in enumerate(objects):
        p = tmp_path / f"o{i}.dcm"
        o.save_as(p, enforce_file_format=True)
        dciodvfy(p)
    (sr_path,) = [tmp_path / f"o{i}.dcm" for i, o in enumerate(objects) if o.Modality == "SR"]
    report = hd.sr.srread(sr_path).content
    rois = [g for g in report.get_planar_roi_measurement_groups() if not str(g.tracking_identifier).endswith(" conclusion")]
    assert len(rois) == 4  # per image: the box, and the image's own classification (outlining the image)
    uid0 = str(images[0].SOPInstanceUID)
    box, group = sorted([g for g in report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=uid0)
                         if not str(g.tracking_identifier).endswith(" conclusion")], key=lambda g: -g.roi.value[0][0])
    assert box.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(box.roi.value[0], [51.5625, 51.5625], atol=1e-3)  # SCOORD: pixel-corner origin
    np.testing.assert_allclose(group.roi.value[0], [0.5, 0.5])  # the whole image
    (prob,) = group.get_measurements(name=rc.to_hd(codes.GROWTH_PLATE_FRACTURE))
    assert prob.value == pytest.approx(100 * math.sqrt(0.9 * 0.8), abs=0.1)  # %, the two-stage score


# --------------------------------------------------------------------------- tiny trained bundle


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> tuple[Path, Path]:
    from training.data import load_records, split_records
    from training.synth.physis_fracture import generate
    from training.tasks import get_adapter
    from training.trainer import TrainConfig, train

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("physis")
    data = root / "data"
    generate(data, 6, seed=1, workers=1)
    adapter = get_adapter("physis_fracture")
    tcfg = adapter.config_model.model_validate({"variant": "light", "det_long_side": 128, "image_size": 64,
                                                "crop_size": 32, "crops_per_image": 2, "n_boot": 20})
    cfg = TrainConfig(epochs=1, batch_size=2, max_steps_per_epoch=2, device="cpu", version="tiny1",
                      lr=1e-4, optimizer="adamw", grad_clip=10.0, split={"train": 0.5, "val": 0.25, "holdout": 0.25})
    records = load_records(data)
    train(adapter, split_records(records, cfg.split), root / "bundle", cfg, tcfg)
    return root / "bundle", data


def test_tiny_bundle_evaluates_all_three_methods(tiny_bundle, tmp_path):
    from training.evaluate import evaluate_bundle

    bundle, data = tiny_bundle
    ev = evaluate_bundle(bundle, data, tmp_path / "eval", device="cpu")
    m = ev.metrics
    for method in ("two_stage", "classifier", "detector"):
        assert 0.0 <= m[f"{method}_accuracy"] <= 1.0
    assert "detector_map50" in m and "detector_froc_mean_sensitivity" in m
    (table,) = ev.result.tables.values()
    assert {"two_stage", "classifier", "detector"} <= set(table)
    assert table["two_stage"]["thesis_accuracy"] == 0.809
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "0.691" in report and "two_stage" in report


def test_tiny_bundle_through_analyze(tiny_bundle, tmp_path, dciodvfy):
    from dicomnode.analyze import analyze

    bundle, data = tiny_bundle
    study = next(p for p in data.iterdir() if p.is_dir())
    written = analyze(study, "physis_fracture", tmp_path / "out", model_dir=bundle, device="cpu")
    mods = sorted(pydicom.dcmread(p).Modality for p in written)
    n_images = sum(1 for p in study.rglob("*.dcm"))
    assert mods.count("SR") == 1 and mods.count("SR") + n_images == len(mods)
    for p in written:
        dciodvfy(p)
    (sr,) = [p for p in written if pydicom.dcmread(p).Modality == "SR"]
    report = hd.sr.srread(sr).content
    assert len(report.get_planar_roi_measurement_groups()) >= n_images  # one per image, plus any boxes
    text = str(pydicom.dcmread(sr))
    assert "tiny1" in text  # algorithm version from the bundle
    # the same study twice gives the same probabilities (deterministic)
    again = analyze(study, "physis_fracture", tmp_path / "again", model_dir=bundle, device="cpu")
    sr2 = next(p for p in again if pydicom.dcmread(p).Modality == "SR")
    probs = [g.get_measurements()[0].value for g in hd.sr.srread(sr).content.get_planar_roi_measurement_groups()]
    probs2 = [g.get_measurements()[0].value for g in hd.sr.srread(sr2).content.get_planar_roi_measurement_groups()]
    assert probs == probs2



def test_method_shortcut_sets_task_method():
    import argparse

    from inference.errors import DicomNodeError
    from training.tasks import get_adapter
    from training.train_cli import add_arguments, build_configs

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    adapter = get_adapter("physis_fracture")
    _, tcfg = build_configs(adapter, parser.parse_args(["physis_fracture", "--data", "d", "--out", "o",
                                                        "--method", "detector"]))
    assert tcfg.method == "detector"
    _, tcfg = build_configs(adapter, parser.parse_args(["physis_fracture", "--data", "d", "--out", "o"]))
    assert tcfg.method == "two_stage" and tcfg.variant == "faithful" and tcfg.det_long_side >= 1024
    with pytest.raises(DicomNodeError):
        build_configs(adapter, parser.parse_args(["physis_fracture", "--data", "d", "--out", "o", "--method", "x"]))


@pytest.mark.parametrize("method,present", [("classifier", ("image_classifier",)), ("detector", ("detector",))])
def test_baseline_bundles_hold_only_their_network(method, present):
    args = physis_init_args(method, variant="light", det_long_side=64, image_size=32, crop_size=32)
    model = build_network("physis_two_stage", **args)
    for name in ("detector", "crop_classifier", "image_classifier"):
        assert (getattr(model, name) is not None) == (name in present)
    assert model.methods == [method]


@pytest.mark.parametrize("box", [(20, 30, 50, 60), (0, 0, 10, 40), (60, 70, 79, 99)])
def test_mined_crops_match_the_serving_crops(box):
    from scipy import ndimage

    from inference.radiograph import crop_with_margin
    from training.tasks.physis_samples import letterbox_crops

    img = ndimage.gaussian_filter(np.random.default_rng(0).random((100, 80)), 4).astype(np.float32)
    img = (img - img.min()) / (img.max() - img.min())
    ref = crop_with_margin(img, box, margin=0.25, min_side=32, out_size=32).tensor[0].numpy()
    got = letterbox_crops(torch.from_numpy(img)[None, None], [torch.tensor([box], dtype=torch.float32)],
                          margin=0.25, min_side=32, size=32)[0, 0].numpy()
    assert got.shape == ref.shape
    assert np.abs(ref - got).mean() < 0.15  # same region, aspect and padding; interpolation differs slightly


def test_mining_labels_proposals_by_iou():
    from training.tasks.physis_samples import mine_proposals

    det = ScriptedDetector([[10, 10, 30, 30], [50, 50, 60, 60], [10, 10, 30, 30]], [FX, FX, METAL], [0.9, 0.8, 0.7])
    gt = torch.tensor([[[12, 12, 30, 30], [0, 0, 0, 0]]], dtype=torch.float32)
    boxes, labels = mine_proposals(det, [torch.zeros(1, 64, 64)], gt, torch.tensor([[FX, 0]]), per_image=4,
                                   iou_thr=0.3)
    assert boxes[0].shape == (2, 4) and labels.tolist() == [1.0, 0.0]  # the metal proposal is never mined
    assert det.training  # the detector's mode is restored


def test_evaluation_inputs_score_like_the_serving_path(tiny_bundle):
    from inference.bundle import load_bundle
    from inference.radiograph import to_float
    from training.data import load_records
    from training.tasks import get_adapter

    bundle_dir, data = tiny_bundle
    bundle = load_bundle(bundle_dir)
    adapter = get_adapter("physis_fracture")
    tcfg = adapter.config_model.model_validate(bundle.meta.task_config)
    model = bundle.build_model()
    record = load_records(data)[0]
    (sample,) = adapter.preprocessor(tcfg)(record)
    image = to_float(pydicom.dcmread(record.files[0]))
    served = task_mod.score_image(model, image, "cpu")
    inputs = task_mod.ImageInputs(torch.from_numpy(sample["det"]).float(), sample["det_to_source"],
                                  torch.from_numpy(sample["image"]).float(), tuple(sample["source_shape"]))
    cached = task_mod.score_image(model, lambda: image, "cpu", inputs=inputs)
    for name, value in served.by_method().items():
        assert cached.by_method()[name] == pytest.approx(value, abs=0.02)  # float16 cache only


# --------------------------------------------------------------------------- wording


def test_negative_image_carries_no_positive_label_and_states_the_operating_point(monkeypatch, tmp_path, dciodvfy):
    """A candidate region scoring 0.73 under an operating point of 0.81 is a negative: no fracture box anywhere."""
    from dicomnode.results.sc import compose
    from inference.palette import colour_for

    args = physis_init_args("two_stage", variant="light", det_long_side=64, image_size=32, crop_size=32)
    model = build_network("physis_two_stage", **args).eval()
    model.detector = ScriptedDetector([[22.4, 16.0, 38.4, 32.0]], [FX], [0.9])
    model.crop_classifier = FixedLogit(0.6)  # combined sqrt(0.9 * 0.6) = 0.735: reportable, but below 0.81
    model.image_classifier = FixedLogit(0.1)
    study = "1.2.826.0.1.3680043.8.498.778"
    images = [dx_dataset(study, study + ".1", 0, rows=200, cols=160)]
    meta = type("Meta", (), {"algorithm_name": "physis", "version": "t1", "synthetic_only": True,
                             "architecture": "physis_two_stage", "task": "physis_fracture",
                             # the served operating point comes from the bundle's task settings
                             "task_config": {"post": {"threshold": 0.5}, "operating_threshold": 0.81}})()
    loaded = LoadedModel(bundle=type("B", (), {"meta": meta})(), model=model, device=torch.device("cpu"))
    monkeypatch.setattr(task_mod, "model_for", lambda task, ctx: loaded)
    f = task_mod.run_physis_fracture(images, TaskContext())
    assert f.classifications[0].value == ABSENT and f.classifications[0].threshold == 0.81
    assert f.boxes == [] and f.overlays[0].panels[0].boxes == []
    assert f.summary.startswith("p=0.73 < 0.81: no growth-plate fracture detected")
    assert "0 of 1 image positive, 0 regions marked" in f.summary
    caption = f.overlays[0].panels[0].caption
    assert "p=0.73 < 0.81: no growth-plate fracture detected" in caption
    assert f.overlays[0].title == "Growth-plate (physis) fracture detection, image 1 of 1"  # names the test only

    (sc,) = [o for o in build_results(f, images, ResultContext()) if o.Modality != "SR"]
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    assert "PHYSIS FRACTURE" not in sc.ImageComments and "p=0.73 < 0.81" in sc.ImageComments
    rgb = compose(f.overlays[0], f, {str(d.SOPInstanceUID): d for d in images})
    assert np.all(rgb == np.array(colour_for("Fracture of growth plate"), np.uint8), axis=2).sum() == 0  # no box


def test_positive_image_box_and_statement_name_the_operating_point(scripted_model, monkeypatch):
    study = "1.2.826.0.1.3680043.8.498.779"
    images = [dx_dataset(study, study + ".1", 0, rows=200, cols=160)]
    meta = type("Meta", (), {"algorithm_name": "physis", "version": "t1", "synthetic_only": True,
                             "architecture": "physis_two_stage"})()
    loaded = LoadedModel(bundle=type("B", (), {"meta": meta})(), model=scripted_model, device=torch.device("cpu"))
    monkeypatch.setattr(task_mod, "model_for", lambda task, ctx: loaded)
    f = task_mod.run_physis_fracture(images, TaskContext())
    assert f.summary == "p=0.85 >= 0.50: growth-plate fracture suspected; 1 of 1 image positive, 1 region marked"
    assert f.overlays[0].panels[0].caption == ("Image 1 of 1: p=0.85 >= 0.50: growth-plate fracture suspected, "
                                               "1 region marked")
    (box,) = f.boxes
    assert box.text == "suspected fracture p=0.85"
