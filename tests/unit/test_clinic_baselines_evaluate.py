"""`evaluate` writes the clinic's simple baselines beside the network into metrics.json and report.md (issue 34)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference.errors import ModelNotFoundError
from inference.registry import ModelRegistry
from training.cli import main as train_main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def knee_eval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The shipped knee bundle and three fresh synthetic knees (the atlas needs at least two)."""
    from training.synth import knee_bone_seg

    try:
        bundle = ModelRegistry(REPO_ROOT / "models").current_dir("knee_bone_seg")
    except ModelNotFoundError as exc:
        pytest.skip(f"no shipped knee bundle: {exc}")
    data = tmp_path_factory.mktemp("knee")
    # variation off: the mean knee at the patient origin, so that the atlas is the strongest baseline here (on
    # default knees it is near 0 since issue 34; tests/unit/test_synth_knee_variation.py checks that)
    knee_bone_seg.generate(data, 3, 21, workers=1, params={"variation": 0})
    return bundle, data


def test_evaluate_writes_baselines_and_the_comparison(knee_eval: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    bundle, data = knee_eval
    out = tmp_path / "eval"
    assert train_main(["evaluate", str(bundle), "--data", str(data), "--subset", "all", "--device", "cpu",
                       "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "strongest simple baseline (coordinate_atlas): dice_mean" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    base = metrics["baselines"]
    assert set(base) == {"coordinate_atlas", "threshold_components"}
    atlas = base["coordinate_atlas"]
    assert atlas["n"] == 3 and "leave one out" in atlas["protocol"]
    assert 0.0 <= atlas["dice_fibula"] <= 1.0 and atlas["dice_femur"] > 0.5  # the knees share patient coordinates
    c = metrics["baseline_comparison"]
    assert c["metric"] == "dice_mean" and c["network"] == pytest.approx(metrics["metrics"]["dice_mean"])
    best = max(b["dice_mean"] for b in base.values())
    assert c["baseline_value"] == pytest.approx(best)
    assert c["margin"] == pytest.approx(c["network"] - best) and c["below_margin"] == (c["margin"] < 0.10)
    report = (out / "report.md").read_text()
    assert "## Network vs strongest simple baseline" in report
    assert "| coordinate_atlas |" in report and "| threshold_components |" in report
    assert f"margin **{c['margin']:+.3f}**" in report
    assert ("below the required margin of 0.10" in report) == c["below_margin"]


def test_clinic_baselines_can_be_left_out(knee_eval: tuple[Path, Path], tmp_path: Path) -> None:
    from training.evaluate import evaluate_bundle

    bundle, data = knee_eval
    ev = evaluate_bundle(bundle, data, tmp_path / "eval", subset="all", device="cpu", clinic_baselines=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert ev.baselines is None and metrics["baselines"] is None and metrics["baseline_comparison"] is None
    assert "strongest simple baseline" not in (tmp_path / "eval" / "report.md").read_text()


def test_validate_reports_the_clinic_baselines_beside_the_network(knee_eval: tuple[Path, Path], tmp_path: Path
                                                                  ) -> None:
    """`dicomnode-train validate` lists the knee atlas and threshold baselines with Dice per bone."""
    bundle, data = knee_eval
    out = tmp_path / "val"
    assert train_main(["validate", str(bundle), "--data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    stored = json.loads((out / "validation.json").read_text())["baselines"]
    assert stored["coordinate_atlas"]["n"] == 3 and 0.0 <= stored["coordinate_atlas"]["dice_mean"] <= 1.0
    report = (out / "report.md").read_text()
    section = report[report.index("Simple baselines beside the network"):]
    assert "dice_fibula" in section and "| coordinate_atlas |" in section and "| threshold_components |" in section
    assert "| network (this bundle) |" in section
