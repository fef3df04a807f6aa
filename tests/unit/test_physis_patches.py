"""Box-patch pretraining of physis_fracture: one view per network (detector trunk, crop and whole-image
classifiers), each cut from its own input, trained in the same steps, and a two-stage run that starts from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.bundle import load_bundle
from inference.imgops import apply_affine
from inference.radiograph import detector_input
from training.cli import main as train_main
from training.data import load_records
from training.errors import TrainError
from training.patch_pretrain import PatchPretrainConfig, PatchSource, PatchView, _samplers
from training.tasks import get_adapter
from training.tasks.physis_patches import DetectorTrunkHead, patch_sources, views_of
from training.tasks.physis_samples import image_boxes, image_label, source_images

SIZES = {"det_long_side": 128, "image_size": 96, "crop_size": 48}
TASK = ["--set", "variant=light", "--set", "det_long_side=128", "--set", "image_size=96", "--set", "crop_size=48"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("physis_patch") / "data"
    assert train_main(["synth", "physis_fracture", "--out", str(out), "--n", "12", "--seed", "4", "--workers", "1",
                       "--difficulty", "0"]) == 0
    return out


def test_each_view_is_its_networks_input_centred_on_the_fracture_boxes(data: Path) -> None:
    seen = {0: 0, 1: 0}
    for rec in load_records(data):
        sources = patch_sources(rec, views=views_of("two_stage"), crop_extent=96.0, **SIZES)
        for _, sop, image in source_images(rec):
            label = image_label(rec.row, sop)
            frac = [b for b, lab in image_boxes(rec.row, sop) if lab == 1]
            mine = [s for s in sources if s.group == rec.key]
            assert sorted(s.view for s in mine) == ["crop", "detector", "image"]
            seen[label] += 1
            for s in mine:
                assert s.label == label and s.image.dtype == np.float16
                if s.view == "detector":
                    prep = detector_input(image, long_side=128)
                    assert s.image.shape == (128, 128) and 0.0 <= float(s.image.min()) <= float(s.image.max()) <= 1.0
                elif s.view == "image":
                    prep = detector_input(image, long_side=96)
                    assert s.image.shape == (96, 96)
                else:  # the source scaled by crop_size / crop_extent: a 96-px box region fills a 48-px patch
                    prep = detector_input(image, long_side=round(max(image.shape) * 0.5), square=False)
                    assert s.image.shape == tuple(round(v * 0.5) for v in image.shape)
                np.testing.assert_allclose(s.image, np.clip(prep.tensor[0].numpy() * prep.std + prep.mean, 0, 1)
                                           if s.view == "detector" else prep.tensor[0].numpy(), atol=2e-2)
                if not label:
                    assert s.centres == ()
                    continue
                back = apply_affine(np.linalg.inv(prep.source_to_model), np.array(s.centres))
                assert len(back) == len(frac)
                for (x, y), box in zip(back, frac, strict=True):  # each centre maps back into its fracture box
                    assert box[0] <= x <= box[2] and box[1] <= y <= box[3]
    assert seen[0] and seen[1]


def test_methods_name_only_the_views_of_their_networks() -> None:
    adapter = get_adapter("physis_fracture")
    for method, views in (("two_stage", {"crop", "detector", "image"}), ("classifier", {"image"}),
                          ("detector", {"detector"})):
        cfg = adapter.config_model.model_validate({"method": method, "variant": "light", **SIZES})
        got = adapter.patch_views(adapter.build_model(cfg), cfg)
        assert set(got) == views == set(views_of(method))
        if "detector" in got:  # covers the same field as the image patch: 64 * 128 / 96
            assert got["detector"].side(64) == 85
        if "crop" in got:
            assert got["crop"].side(64) == 48


def test_detector_view_trains_the_trunk_in_place_and_its_head_is_not_saved() -> None:
    adapter = get_adapter("physis_fracture")
    cfg = adapter.config_model.model_validate({"variant": "light", **SIZES})
    torch.manual_seed(0)
    model = adapter.build_model(cfg)
    head = DetectorTrunkHead(model.detector)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    x = torch.rand(4, 1, 40, 40)
    logits = head(x)
    assert logits.shape == (4, 1)
    torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor([1.0, 0, 1, 0])).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("detector.backbone.body.") for k in changed)
    assert not any(k.startswith(("detector.rpn", "detector.roi_heads", "detector.backbone.fpn",
                                 "crop_classifier", "image_classifier")) for k in changed)
    assert not any("head.weight" == k.split("detector.")[-1] for k in after)


def test_sources_of_a_view_the_network_lacks_are_refused() -> None:
    img = np.zeros((32, 32), np.float16)
    src = [PatchSource(img, 1, ((16.0, 16.0),), "a", "crop"), PatchSource(img, 0, (), "b", "crop")]
    views = {"image": PatchView(torch.nn.Identity())}
    with pytest.raises(TrainError, match="views \\['crop'\\]"):
        _samplers(views, src, PatchPretrainConfig(), 0, "training")


def test_pretrain_all_views_then_train_the_two_stage_model_from_it(data: Path, tmp_path: Path) -> None:
    pre = tmp_path / "pre"
    assert train_main(["pretrain-patches", "physis_fracture", "--data", str(data), "--out", str(pre), "--device",
                       "cpu", "--set", "patch=32", "--set", "batch_size=4", "--set", "steps=2", "--set",
                       "eval_every=1", "--set", "val_patches=8", "--set", "workers=0",
                       "--set", "split={train: 0.5, val: 0.25, holdout: 0.25}", *TASK]) == 0
    meta = json.loads((pre / "bundle.json").read_text())
    assert meta["purpose"] == "pretraining" and "patches crop 48x48, detector 43x43, image 32x32" in meta["notes"]
    assert len(meta["training_log"]) == 2
    # every network learned; the detector's FPN, RPN and box head keep their fresh initialisation
    adapter = get_adapter("physis_fracture")
    cfg = adapter.config_model.model_validate({"variant": "light", **SIZES})
    torch.manual_seed(0)
    fresh = adapter.build_model(cfg).state_dict()
    learned = load_bundle(pre).state_dict
    changed = {k for k in fresh if not torch.allclose(fresh[k].float(), learned[k].float())}
    for prefix in ("detector.backbone.body.", "crop_classifier.", "image_classifier."):
        assert any(k.startswith(prefix) for k in changed), prefix
    assert not any(k.startswith(("detector.rpn", "detector.roi_heads")) for k in changed)
    out = tmp_path / "bundle"
    assert train_main(["train", "physis_fracture", "--data", str(data), "--out", str(out), "--device", "cpu",
                       "--epochs", "1", "--set", f"init_from={pre}", "--set", "max_steps_per_epoch=1",
                       "--set", "batch_size=2", "--set", "n_boot=10", "--set", "crops_per_image=2",
                       "--set", "split={train: 0.5, val: 0.25, holdout: 0.25}", *TASK]) == 0
    trained = json.loads((out / "bundle.json").read_text())
    assert trained["purpose"] != "pretraining" and "initialised from bundle physis_fracture/" in trained["notes"]


def test_accuracy_threshold_takes_the_middle_of_the_best_flat_stretch() -> None:
    from training.metrics import accuracy_threshold

    y = [0, 0, 0, 1, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.55, 0.6, 0.7, 0.8, 0.9]
    thr, acc = accuracy_threshold(y, s)
    assert acc == pytest.approx(7 / 8) and thr in (pytest.approx(0.425), pytest.approx(0.65))
    thr, acc = accuracy_threshold([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9])  # all scores high: the cut moves up
    assert acc == 1.0 and thr == pytest.approx(0.75)
    with pytest.raises(ValueError):
        accuracy_threshold([], [])


def test_tune_sets_the_served_threshold_of_the_highest_validation_accuracy() -> None:
    from training.adapter import EvalResult

    adapter = get_adapter("physis_fracture")
    cfg = adapter.config_model.model_validate({"variant": "light", **SIZES})
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.55, 0.6, 0.62, 0.65, 0.8, 0.85, 0.9, 0.95])  # geometric means sit high: 0.5 calls all positive
    tuned, note = adapter.tune(EvalResult(metrics={}, y_true=y, y_prob=s), cfg)
    assert tuned.operating_threshold == pytest.approx(0.725) and "accuracy 0.500 at 0.50 -> 1.000" in note
    assert tuned.post_config().threshold == pytest.approx(0.725)
    _, args = adapter.architecture(tuned)
    assert "post" not in args  # the rules are settings (task_config), not a second copy in the network args
    assert "operating_threshold" in adapter.config_model.after_training  # retune may change it, resume ignores it
    off = cfg.model_copy(update={"tune_threshold": False})
    assert adapter.tune(EvalResult(metrics={}, y_true=y, y_prob=s), off) == (off, "")
