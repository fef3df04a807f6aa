"""`dicomnode-train compare`: one table from several evaluations of one task on the same records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.compare import CompareError, compare, load_evaluation, metric_at, table_md


def _evaluation(tmp: Path, name: str, *, backbone: str, f1: float, sens: dict[str, float],
                holdout: str = "h" * 64, task: str = "spine_bmd", version: str = "v1") -> Path:
    """An evaluation folder holding what `evaluate` writes into metrics.json (test data)."""
    d = tmp / name
    d.mkdir()
    payload = {"task": task, "version": version, "n_records": 40, "holdout_hash": holdout,
               "primary_metric": "vertebra_macro_f1", "architecture": "spine_detector",
               "task_config": {"backbone": backbone, "variant": "light"},
               "metrics": {"vertebra_macro_f1": f1, "sensitivity_per_class": sens, "map50": 0.5,
                           "paper_map": 70.0, "paper_recall": 80.0, "paper_acc": 60.0}}
    (d / "metrics.json").write_text(json.dumps(payload), encoding="utf-8")
    return d


def test_rows_per_backbone_columns_from_dotted_paths_and_paper_rows(tmp_path: Path) -> None:
    a = _evaluation(tmp_path, "a", backbone="resnet50", f1=0.61, sens={"osteopenia": 0.4})
    b = _evaluation(tmp_path, "b", backbone="resnet50_ds", f1=0.78, sens={"osteopenia": 0.7})
    table = compare([load_evaluation(a), load_evaluation(b / "metrics.json")])
    ours = [r for r in table["rows"] if r["source"] == "ours"]
    assert [r["name"] for r in ours] == ["resnet50 (light) v1", "resnet50_ds (light) v1"]
    assert [r["values"]["vertebra_macro_f1"] for r in ours] == [0.61, 0.78]
    assert ours[1]["values"]["sensitivity_per_class.osteopenia"] == 0.7
    assert ours[0]["values"]["sensitivity_per_class.normal"] is None  # absent metric: a dash, not an error
    paper = {r["name"]: r["values"] for r in table["rows"] if r["source"] == "reference"}
    assert paper["paper resnet50_ds"]["paper_map"] == 83.4 and paper["paper resnet50"]["paper_acc"] == 74.1
    assert paper["paper resnet50_se"]["vertebra_macro_f1"] is None
    md = table_md(table)
    assert "| resnet50_ds (light) v1 |" in md and "0.780" in md and "paper resnet50_sk (source document)" in md
    assert "same 40 records" in md


def test_refuses_different_data_tasks_duplicates_and_non_evaluations(tmp_path: Path) -> None:
    a = load_evaluation(_evaluation(tmp_path, "a", backbone="resnet50", f1=0.6, sens={}))
    other = load_evaluation(_evaluation(tmp_path, "b", backbone="resnet50_se", f1=0.7, sens={}, holdout="x" * 64))
    with pytest.raises(CompareError, match="different records"):
        compare([a, other])
    table = compare([a, other], allow_different_data=True)
    assert not table["same_data"] and "different records" in table_md(table)
    knee = load_evaluation(_evaluation(tmp_path, "k", backbone="-", f1=0.9, sens={}, task="knee_bone_seg"))
    with pytest.raises(CompareError, match="several tasks"):
        compare([a, knee])
    again = load_evaluation(_evaluation(tmp_path, "a2", backbone="resnet50", f1=0.6, sens={}))
    with pytest.raises(CompareError, match="second evaluation"):
        compare([a, again])
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CompareError, match="not a readable evaluation"):
        load_evaluation(tmp_path / "junk")
    with pytest.raises(CompareError, match="missing"):
        (tmp_path / "junk" / "metrics.json").write_text('{"task": "spine_bmd"}', encoding="utf-8")
        load_evaluation(tmp_path / "junk")
    with pytest.raises(CompareError, match="no evaluation"):
        compare([])


def test_metric_at_and_default_columns(tmp_path: Path) -> None:
    assert metric_at({"a": {"b": 2}}, "a.b") == 2 and metric_at({"a": 1}, "a.b") is None
    knee = load_evaluation(_evaluation(tmp_path, "k", backbone="-", f1=0.9, sens={}, task="knee_bone_seg"))
    table = compare([knee])
    assert table["columns"] == ["dice_mean"]  # default: the primary metric only
    assert [r["name"] for r in table["rows"]] == ["v1"]


def test_cli_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.cli import main

    a = _evaluation(tmp_path, "a", backbone="resnet50", f1=0.6, sens={})
    b = _evaluation(tmp_path, "b", backbone="resnet50_ds", f1=0.7, sens={})
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith("# Comparison: spine_bmd")
    assert len(json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]) == 2 + 4
    assert main(["compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().out
