"""``dicomnode-train validate`` of the shipped ``hrpqct_motion`` and ``knee_bone_seg`` bundles on tiny synthetic
site folders: per-record predictions give subgroup tables for both tasks, and the rescan threshold sweep and
confusion matrices at the operating point for hrpqct_motion."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main as train_main
from training.synth.manifest import read_manifest
from training.validate_stats import Scores, multiclass_figures, rescan_sweep, subgroup_table

MODELS = Path(__file__).resolve().parents[2] / "models"
GROUPS = ("age band", "sex", "manufacturer", "body part", "view")


def _site(tmp_path: Path, task: str) -> Path:
    torch.set_num_threads(2)
    data = tmp_path / "site"
    assert train_main(["synth", task, "--out", str(data), "--n", "4", "--seed", "3", "--workers", "1"]) == 0
    return data


def _validate(tmp_path: Path, task: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Path]:
    monkeypatch.chdir(tmp_path)  # from another folder, as a user would
    assert train_main(["validate", str(MODELS / task / "current"), "--data", "site", "--device", "cpu",
                       "--n-boot", "50", "--out", "report"]) == 0
    out = tmp_path / "report"
    return json.loads((out / "validation.json").read_text()), out


def test_hrpqct_motion_subgroups_rescan_sweep_and_operating_point(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = _site(tmp_path, "hrpqct_motion")
    rows = read_manifest(data)
    rows[0]["label"] = 5  # the site graded one scan 5: a rescan the metrics must count
    (data / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    truth = [int(r["label"]) for r in rows]
    v, out = _validate(tmp_path, "hrpqct_motion", monkeypatch)
    fig, task = v["figures"], v["task_metrics"]
    # the bundle's own scan grades (its aggregation and cut points), as the task's evaluation computed them
    assert fig["confusion_matrix"] == task["confusion_matrix"]
    assert [sum(r) for r in fig["confusion_matrix"]] == np.bincount(np.array(truth) - 1, minlength=5).tolist()
    sens, spec = fig["rescan sensitivity"], fig["rescan specificity"]
    assert (sens["n"], spec["n"]) == (1, 3) and fig["rescan_positives"] == 1
    assert sens["value"] == pytest.approx(task["rescan_sensitivity"])
    assert spec["value"] == pytest.approx(task["rescan_specificity"])
    (tn, fp), (fn, tp) = fig["rescan_confusion_matrix"]
    assert (tp, fn, tn, fp) == (sens["k"], 1 - sens["k"], spec["k"], 3 - spec["k"])
    assert fig["rescan_threshold"] == pytest.approx(json.loads(
        (MODELS / "hrpqct_motion" / Path(v["bundle"]).name / "bundle.json").read_text())["task_config"][
        "rescan_threshold"])
    sweep = fig["rescan_sweep"]
    assert len(sweep) == 19 and all(r["tp"] + r["fn"] == 1 and r["tn"] + r["fp"] == 3 for r in sweep)
    assert all(a["sensitivity"] >= b["sensitivity"] and a["specificity"] <= b["specificity"]
               for a, b in zip(sweep, sweep[1:], strict=False))
    for g in GROUPS:
        table = v["subgroups"][g]
        assert sum(r["n"] for r in table.values()) == 4
        assert sum(r["rescan_positives"] for r in table.values()) == 1
        for r in table.values():
            assert {"kappa_quadratic", "rescan_sensitivity", "rescan_specificity"} <= set(r)
    report = (out / "report.md").read_text()
    assert "**rescan: P(grade 4 or worse) >= threshold**" in report and "truth \\ decision" in report
    assert report.count("\n| 0.") >= 19 and "## Subgroups" in report and "gives no per-record" not in report
    assert "rescan_sensitivity" in (out / "report.html").read_text()


def test_knee_bone_seg_dice_per_volume_and_subgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _site(tmp_path, "knee_bone_seg")
    v, out = _validate(tmp_path, "knee_bone_seg", monkeypatch)
    per = v["per_record"]
    assert v["studies_scored"] == len(per) == 4 and len({r["study"] for r in per}) == 4
    bones = ("dice_femur", "dice_tibia", "dice_fibula")
    for r in per:
        assert all(0.0 <= r[k] <= 1.0 for k in bones)
        assert r["dice_mean"] == pytest.approx(np.mean([r[k] for k in bones]))
    assert all(isinstance(v["task_metrics"][f"hd95_{b}_missed"], int) for b in ("femur", "tibia", "fibula"))
    for k in bones:  # the task's pooled figure is the mean over the volumes
        assert v["task_metrics"][k] == pytest.approx(np.mean([r[k] for r in per]))
    for g in GROUPS:
        table = v["subgroups"][g]
        assert sum(r["n"] for r in table.values()) == 4
        assert all(set(bones) <= set(r) for r in table.values())
    sex = v["subgroups"]["sex"]
    assert sum(sex[s]["n"] * sex[s]["dice_femur"] for s in sex) == pytest.approx(
        sum(r["dice_femur"] for r in per))
    report = (out / "report.md").read_text()
    assert "## Subgroups" in report and "## Dice per volume" in report and "| per volume; n=4 |" in report
    assert "no decision threshold" in report and "gives no per-record" not in report


def test_rescan_rule_by_hand() -> None:
    # grades 1, 3, 4, 5 (classes 0..4); rescan from grade 4; threshold 0.3 on P(grade >= 4)
    prob = np.array([[0.9, 0.05, 0.05, 0, 0], [0, 0.2, 0.4, 0.3, 0.1], [0, 0, 0.5, 0.5, 0], [0, 0, 0.9, 0.05, 0.05]])
    s = Scores("study", [f"grade {g}" for g in range(1, 6)], np.array([0, 2, 3, 4]), prob, np.array([0, 2, 3, 2]),
               np.arange(4), np.array(["a", "b", "c", "d"]), p_rescan=prob[:, 3:].sum(1),
               rescan_pred=np.array([0, 1, 1, 0]), rescan_min_class=3, rescan_threshold=0.3)
    rows = {r["threshold"]: r for r in rescan_sweep(s, [0.05, 0.3, 0.5, 0.95])}
    # the scan graded 4 is a rescan at every threshold; the grade-3 scan with P=0.1 only at 0.05
    assert [(rows[t]["tp"], rows[t]["fp"]) for t in (0.05, 0.3, 0.5, 0.95)] == [(2, 1), (1, 1), (1, 0), (1, 0)]
    fig = multiclass_figures(s, n_boot=0)
    assert fig["rescan_confusion_matrix"] == [[1, 1], [1, 1]] and fig["rescan sensitivity"]["value"] == 0.5
    t = subgroup_table(s, ["F", "F", "M", "M"])
    assert (t["M"]["rescan_positives"], t["M"]["rescan_sensitivity"]) == (2, 0.5)
    assert math.isnan(t["F"]["rescan_sensitivity"]) and t["F"]["rescan_specificity"] == 0.5
    assert t["F"]["kappa_quadratic"] == pytest.approx(1.0)
