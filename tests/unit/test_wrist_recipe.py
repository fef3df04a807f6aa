"""The wrist demo recipe (scripts/train_demo/wrist_fracture.sh) end to end at toy size: box-patch pretraining at a
smaller input, a whole-image warm-up there, then the final run from the warm-up's weights, and the hold-out
evaluation. The figures of a toy run mean nothing; the real run's are in models/README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_recipe_chains_pretraining_warm_up_and_final_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "N_TRAIN": "30", "N_HOLDOUT": "6", "EPOCHS": "1",
           "DEVICE": "cpu", "WORKERS": "2", "DIFFICULTY": "0", "PRETRAIN_S": "2", "PRETRAIN_HW": "[128,86]",
           "PATCH": "32", "WARMUP_S": "1", "VERSION": "toy", "OMP_NUM_THREADS": "2",
           "TRAIN_ARGS": "--set input_hw=[128,86] --set stages=4 --set max_steps_per_epoch=1 --set n_boot=10"}
    run = subprocess.run(["bash", "scripts/train_demo/wrist_fracture.sh", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    pre = load_bundle(tmp_path / "pretrain").meta
    warm = load_bundle(tmp_path / "warmup").meta
    final = load_bundle(tmp_path / "bundle").meta
    assert pre.purpose == "pretraining" and pre.input.size == [128, 86] and pre.version == "toy-pretrain"
    assert "initialised from bundle wrist_fracture/toy-pretrain" in warm.notes
    assert "initialised from bundle wrist_fracture/toy-warmup" in final.notes
    assert final.purpose == "inference" and final.task_config["image_labels"] == "boxes"
    assert final.weights_dtype == "float16"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "study_auc" in json.dumps(metrics)
