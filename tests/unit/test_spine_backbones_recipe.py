"""Issue 8's backbone-comparison recipe (scripts/train_demo/spine_backbones.sh), run end to end at toy size.

Two backbones, one training step each, from the shipped bundle's shared weights: the recipe must train each
variant from the same start (attention fresh), evaluate both on the same hold-out and write one comparison table.
The figures of a toy run mean nothing; the real run's table is in models/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference.bundle import load_bundle
from tests.shipped import ROOT, shipped_bundle

SHARED = shipped_bundle("spine_bmd")


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.exists(), reason="no shipped spine_bmd bundle to share weights from")
def test_recipe_trains_each_backbone_from_the_shared_start_and_compares_them(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "N_TRAIN": "6", "N_HOLDOUT": "1", "EPOCHS": "1", "MAX_STEPS": "1",
           "DEVICE": "cpu", "WORKERS": "2", "IMAGE_SIZE": "128", "BACKBONES": "resnet50 resnet50_ds",
           "SHARED_START": str(SHARED), "OMP_NUM_THREADS": "2"}
    run = subprocess.run(["bash", "scripts/train_demo/spine_backbones.sh", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shared = load_bundle(SHARED).meta
    plain = load_bundle(tmp_path / "resnet50" / "bundle").meta
    ds = load_bundle(tmp_path / "resnet50_ds" / "bundle").meta
    # every tensor of the plain network comes from the shared start; the DS network's attention starts fresh
    assert "initialised 116 of 116 tensors" in plain.notes and shared.version in plain.notes
    assert "initialised 116 of 168 tensors" in ds.notes and "52 started fresh" in ds.notes
    assert "backbone.body.attn_*" in ds.notes
    assert (plain.init_args["backbone"], ds.init_args["backbone"]) == ("resnet50", "resnet50_ds")
    table = json.loads((tmp_path / "compare" / "compare.json").read_text())
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    assert [r["name"].split()[0] for r in ours] == ["resnet50", "resnet50_ds"] and table["same_data"]
    assert "patient_macro_f1" in table["columns"]
    assert "paper resnet50_ds" in (tmp_path / "compare" / "compare.md").read_text()
