"""The physis demo recipe (scripts/train_demo/physis_fracture.sh) end to end at toy size: box-patch pretraining of
the three networks, the two-stage run from those weights, and the hold-out evaluation of all three methods. The
figures of a toy run mean nothing; the real run's are in models/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.bundle import load_bundle
from tests.shipped import ROOT


@pytest.mark.slow
def test_recipe_pretrains_all_networks_then_trains_and_evaluates_the_two_stage_model(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "N_TRAIN": "12", "N_HOLDOUT": "4", "EPOCHS": "1",
           "DEVICE": "cpu", "WORKERS": "2", "DIFFICULTY": "0", "PRETRAIN_S": "2", "PATCH": "32", "PATCH_BATCH": "4",
           "DET_SIDE": "128", "IMAGE_SIZE": "96", "CROP_SIZE": "48", "BATCH": "2", "VERSION": "toy",
           "OMP_NUM_THREADS": "2", "TRAIN_ARGS": "--set max_steps_per_epoch=1 --set n_boot=10 --set crops_per_image=2"}
    run = subprocess.run(["bash", "scripts/train_demo/physis_fracture.sh", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pre = load_bundle(tmp_path / "pretrain").meta
    final = load_bundle(tmp_path / "bundle").meta
    assert pre.purpose == "pretraining" and pre.version == "toy-pretrain"
    assert pre.train_config["batch_size"] == 4 and pre.task_config["det_long_side"] == 128
    assert "initialised from bundle physis_fracture/toy-pretrain" in final.notes
    assert final.purpose == "inference" and final.task_config["variant"] == "light"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for method in ("two_stage", "classifier", "detector"):
        assert f"{method}_auc" in json.dumps(metrics)
