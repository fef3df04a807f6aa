"""Box-patch pretraining: where the patches come from, and the pretraining bundle's life (train from it, never
serve it, never reuse it on another split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.errors import BundleError
from inference.registry import ModelRegistry
from training.cli import main as train_main
from training.data import load_records
from training.errors import TrainError
from training.patch_pretrain import PatchPretrainConfig, PatchSampler, PatchSource
from training.tasks.wrist_fracture import _prepared_parts, patch_sources

HW = (128, 86)
STAGE = ["--set", "input_hw=[128,86]", "--set", "stages=3", "--set", "patch=32", "--set", "batch_size=8",
         "--set", "val_patches=16", "--set", "eval_every=2", "--set", "workers=0"]
TRAIN = ["--set", "input_hw=[128,86]", "--set", "stages=3", "--set", "batch_size=8", "--set", "n_boot=20",
         "--set", "max_steps_per_epoch=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patch") / "data"
    assert train_main(["synth", "wrist_fracture", "--out", str(out), "--n", "24", "--seed", "3", "--workers", "1",
                       "--difficulty", "0"]) == 0
    return out


def _kw() -> dict:
    return {"input_hw": HW, "mean": 0.34587, "std": 0.22898, "split": True, "min_share": 0.02, "align": True}


def test_patch_sources_centre_on_the_box_and_leave_out_unboxed_images_of_fractured_studies(data: Path) -> None:
    records = load_records(data)
    seen_pos = seen_neg = 0
    for rec in records:
        sources = patch_sources(rec, **_kw())
        positive = bool(rec.row["label"])
        if not positive:
            # every part of every image of a negative study is a negative source
            assert len(sources) >= len(rec.files) and all(s.label == 0 and not s.centres for s in sources)
            seen_neg += 1
            continue
        boxed = {b["sop_instance_uid"] for b in rec.row["boxes"]}
        assert len(sources) <= len(boxed)  # an image of a fractured study without a box gives no source
        parts = [(prep, boxes) for prep, label, _, boxes in _prepared_parts(rec, image_labels="boxes", **_kw())
                 if label]
        for src, (prep, boxes) in zip(sources, parts, strict=False):
            assert src.label == 1 and src.group == rec.key
            # the model-space centre maps back onto the box's centre in the source image
            back = prep.points_to_source(np.array(src.centres))
            want = np.array([[(b["x0"] + b["x1"]) / 2, (b["y0"] + b["y1"]) / 2] for b in boxes])
            assert np.allclose(back, want[: len(back)], atol=1e-3)
            seen_pos += 1
    assert seen_pos and seen_neg


def _coord_image(h: int = 60, w: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx + 1000.0 * yy).astype(np.float32)  # exact (float16 would round the codes)


def test_negatives_are_cut_where_the_lesions_are_and_batches_alternate() -> None:
    cfg = PatchPretrainConfig(patch=16, jitter=0.0, hflip_p=0.0)
    pos = PatchSource(np.zeros((60, 40), np.float16), 1, ((30.0, 20.0),), "a")
    neg = PatchSource(_coord_image(), 0, (), "b")
    sampler = PatchSampler([pos, neg], cfg, np.random.default_rng(0))
    x, y = sampler.batch(6)
    assert x.shape == (6, 1, 16, 16) and y.tolist() == [1, 0, 1, 0, 1, 0]
    for patch in x[1::2, 0].numpy():
        # the negative patch's top-left pixel encodes its position: centred on the lesion centre (30, 20)
        top_left = float(patch[0, 0])
        assert (top_left // 1000, top_left % 1000) == (12.0, 22.0)


def test_patches_off_the_edge_read_as_the_image_minimum() -> None:
    cfg = PatchPretrainConfig(patch=16, jitter=0.0, hflip_p=0.0)
    image = np.full((20, 20), 5.0, np.float16)
    image[0, 0] = -2.0
    sampler = PatchSampler([PatchSource(image, 1, ((0.0, 0.0),), "a"), PatchSource(image, 0, (), "b")], cfg,
                           np.random.default_rng(0))
    patch = sampler.crop(image, (0.0, 0.0))
    assert patch.shape == (16, 16) and patch[0, 0] == -2.0 and patch[8, 8] == -2.0 and patch[15, 15] == 5.0


def test_a_sampler_without_negatives_is_refused() -> None:
    with pytest.raises(TrainError, match="negative"):
        PatchSampler([PatchSource(np.zeros((8, 8), np.float16), 1, ((4.0, 4.0),), "a")], PatchPretrainConfig(),
                     np.random.default_rng(0))


def test_pretrain_then_train_from_it_but_never_serve_it(data: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    pre = tmp_path / "pre"
    assert train_main(["pretrain-patches", "wrist_fracture", "--data", str(data), "--out", str(pre), "--set",
                       "steps=4", *STAGE, "--device", "cpu", "--version", "pre1", "--synthetic"]) == 0
    meta = json.loads((pre / "bundle.json").read_text())
    assert meta["purpose"] == "pretraining" and meta["train_config"]["stage"] == "patch_pretrain"
    assert meta["input"]["size"] == list(HW) and [r["step"] for r in meta["training_log"]] == [2, 4]
    assert 0.0 <= meta["metrics"]["val_patch_auc"] <= 1.0
    with pytest.raises(BundleError, match="pretraining"):
        ModelRegistry(tmp_path / "registry").promote("wrist_fracture", pre)

    out = tmp_path / "bundle"
    assert train_main(["train", "wrist_fracture", "--data", str(data), "--out", str(out), "--epochs", "1",
                       "--device", "cpu", "--version", "ft1", *TRAIN, "--set", f"init_from={pre}"]) == 0
    fine = json.loads((out / "bundle.json").read_text())
    assert fine["purpose"] == "inference" and "initialised from bundle wrist_fracture/pre1" in fine["notes"]
    ModelRegistry(tmp_path / "registry").promote("wrist_fracture", out)

    # the same pretraining weights under another split may have seen this run's hold-out: refused
    other = tmp_path / "other"
    assert train_main(["train", "wrist_fracture", "--data", str(data), "--out", str(other), "--epochs", "1",
                       "--device", "cpu", *TRAIN, "--set", f"init_from={pre}",
                       "--set", "split.salt=another-salt"]) == 2
    assert not other.exists()


def test_unknown_keys_and_tasks_without_boxes_are_refused(data: Path, tmp_path: Path) -> None:
    assert train_main(["pretrain-patches", "wrist_fracture", "--data", str(data), "--out", str(tmp_path / "x"),
                       "--set", "no_such_key=1"]) == 2
    assert train_main(["pretrain-patches", "hrpqct_motion", "--data", str(data), "--out", str(tmp_path / "y"),
                       "--device", "cpu"]) == 2
