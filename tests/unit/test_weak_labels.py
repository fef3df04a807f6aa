"""Weak labels: spine trains from per-level (DXA) classes without boxes, on level-finder pseudo-boxes recorded as
such in the bundle, and is validated on those classes; wrist trains from study labels alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.bundle import read_meta
from training.cli import main as train_main
from training.data import DataError, SplitConfig, load_records, split_records
from training.metrics import box_iou
from training.synth.manifest import read_manifest
from training.tasks.spine_bmd import SpineBmdAdapter, prepare_record
from training.trainer import TrainConfig, train


def _strip(data: Path, keep: tuple[str, ...]) -> None:
    rows = [{k: v for k, v in r.items() if k in keep} for r in read_manifest(data)]
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def spine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Three synthetic lumbar CTs: the manifest with boxes (truth) and a copy with DXA-style classes only."""
    root = tmp_path_factory.mktemp("spine_weak")
    boxed = root / "boxed"
    assert train_main(["synth", "spine_bmd", "--out", str(boxed), "--n", "3", "--seed", "3", "--workers", "1"]) == 0
    weak = root / "dxa_only"
    shutil.copytree(boxed, weak)
    _strip(weak, ("study_uid", "vertebrae", "label", "task"))
    return {"root": root, "boxed": load_records(boxed), "weak": weak}


def test_pseudo_boxes_match_the_drawn_boxes(spine: dict[str, object]) -> None:
    from inference.tasks.spine_bmd import SpineParams

    params = SpineParams(image_size=128)
    weak = {r.key: r for r in load_records(spine["weak"])}
    for boxed in spine["boxed"][:2]:  # type: ignore[index]
        record = weak[boxed.key]
        with pytest.raises(DataError, match="pseudo_boxes=true"):
            prepare_record(record, params=params, negatives=0)
        samples = prepare_record(record, params=params, negatives=2, pseudo_boxes=True)
        truth = {s["slice"]: s for s in prepare_record(boxed, params=params, negatives=0)}
        ious, same_class = [], []
        for s in samples:
            t = truth.get(s["slice"])
            if t is None or not len(s["boxes"]):
                continue
            ious.append(float(box_iou(s["boxes"], t["boxes"]).max()))
            same_class.append(int(s["labels"][0]) == int(t["labels"][0]))
        assert len(ious) >= 8 and np.median(ious) > 0.75 and all(same_class)
        assert any(not len(s["boxes"]) for s in samples)  # disc slices between the found levels as negatives


def test_spine_trains_on_pseudo_boxes_and_validates_on_dxa_classes(spine: dict[str, object], tmp_path: Path) -> None:
    from training.validate import validate

    torch.set_num_threads(2)
    adapter = SpineBmdAdapter()
    records = load_records(spine["weak"])  # type: ignore[arg-type]
    tcfg = adapter.config({"variant": "light", "image_size": 128, "box_score_thresh": 0.0, "pseudo_boxes": True})
    cfg = TrainConfig(epochs=1, batch_size=2, max_steps_per_epoch=2, optimizer="sgd", lr=0.01, device="cpu",
                      version="weak", split=SplitConfig(train=0.67, val=0.0, holdout=0.33))
    result = train(adapter, split_records(records, cfg.split), tmp_path / "bundle", cfg, tcfg)
    meta = read_meta(result.bundle_dir)
    assert meta.task_config["pseudo_boxes"] is True
    assert "pseudo-boxes" in (result.bundle_dir / "card.md").read_text()
    v = validate(result.bundle_dir, spine["weak"], tmp_path / "rep", device="cpu", n_boot=20)  # type: ignore[arg-type]
    assert v.scores is not None and v.scores.unit == "vertebra" and len(v.scored) + len(
        {f.key for f in v.failures if f.stage != "inference"}) == 3
    assert set(v.figures) >= {"macro_f1", "kappa_quadratic", "accuracy", "confusion_matrix"}
    assert int(np.sum(v.figures["confusion_matrix"])) == len(v.scores.y_true)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "P(osteopenia or worse)" in report and "**manufacturer**" in report


def test_wrist_trains_from_study_labels_alone(tmp_path: Path) -> None:
    data = tmp_path / "wrist"
    assert train_main(["synth", "wrist_fracture", "--out", str(data), "--n", "6", "--seed", "4", "--workers", "1"]) == 0
    _strip(data, ("study_uid", "label"))
    assert not any(r.get("boxes") for r in read_manifest(data))
    out = tmp_path / "bundle"
    assert train_main(["train", "wrist_fracture", "--data", str(data), "--out", str(out), "--epochs", "1",
                       "--device", "cpu", "--set", "input_hw=[96,64]", "--set", "stages=3", "--set", "n_boot=10",
                       "--set", "max_steps_per_epoch=1"]) == 0
    meta = read_meta(out)
    assert meta.task_config["image_labels"] == "study" and "study_auc" in meta.metrics
    # a study-label bundle is evaluated on the study labels as they are (no refusal)
    assert train_main(["evaluate", str(out), "--data", str(data), "--subset", "all", "--device", "cpu",
                       "--out", str(tmp_path / "ev")]) == 0
