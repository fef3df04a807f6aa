"""Task settings are defined once (inference.task_settings), validated when a bundle loads, shared with training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from inference.bundle import BUNDLE_JSON, BundleMeta, load_bundle, read_meta, save_bundle
from inference.errors import BundleError
from inference.registry import load_model
from inference.task_settings import (
    SETTINGS,
    HrpqctMotionSettings,
    PhysisFractureSettings,
    SpineBmdSettings,
    WristFractureSettings,
    settings_of,
)

MODELS = Path(__file__).resolve().parents[2] / "models"
TASKS = ("wrist_fracture", "physis_fracture", "spine_bmd", "hrpqct_motion", "knee_bone_seg")


def _current(task: str) -> Path:
    return MODELS / task / (MODELS / task / "current").read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("task", TASKS)
def test_every_shipped_bundle_loads_with_its_settings(task: str) -> None:
    bundle = load_bundle(_current(task))
    settings = settings_of(bundle.meta, SETTINGS[task])
    # every key the shipped bundle carries is a setting, with the value it carries
    assert settings.model_dump(mode="json", include=set(bundle.meta.task_config)) == bundle.meta.task_config


@pytest.mark.parametrize("task", TASKS)
def test_training_and_serving_share_the_class(task: str) -> None:
    from training.adapter import TaskConfig
    from training.tasks import get_adapter

    assert get_adapter(task).config_model is SETTINGS[task]
    assert issubclass(SETTINGS[task], TaskConfig)


def test_settings_are_frozen_and_typed() -> None:
    s = WristFractureSettings()
    with pytest.raises(ValidationError):
        s.threshold = 0.7  # type: ignore[misc]
    assert s.model_copy(update={"threshold": 0.7}).threshold == 0.7
    for field in WristFractureSettings.model_fields.values():
        assert field.annotation is not None


def _tiny_bundle(tmp_path: Path, task: str, task_config: dict) -> Path:
    meta = BundleMeta(task=task, version="t1", architecture="none", task_config={})
    d = save_bundle(tmp_path / task / "t1", meta, {"w": torch.zeros(2)}, "card")
    raw = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
    raw["task_config"] = task_config  # an edited bundle.json, as a site might hand-tune it
    (d / BUNDLE_JSON).write_text(json.dumps(raw), encoding="utf-8")
    return d


@pytest.mark.parametrize("task, task_config, key, words", [
    ("wrist_fracture", {"threshold": 1.5}, "task_config.threshold", "less than 1"),
    ("wrist_fracture", {"input_hw": [512]}, "task_config.input_hw", "fix: give a valid value"),
    ("hrpqct_motion", {"aggregation": "expected", "grade_cutpoints": [4.0, 3.0, 2.0, 1.5]},
     "task_config.grade_cutpoints", "strictly increasing"),
    ("hrpqct_motion", {"grade_cutpoints": [1.5, 2.5, 3.5, 4.5]}, "task_config", "need aggregation 'expected'"),
    ("spine_bmd", {"class_log_offsets": [0.0, float("nan"), 0.0]}, "task_config.class_log_offsets", "finite"),
    ("physis_fracture", {"post": {"bogus": 1}}, "task_config.post", "unknown post-processing keys"),
    ("physis_fracture", {"post": {"top_k": 0}}, "task_config.post", "top_k must be an integer >= 1"),
    ("physis_fracture", {"post": {"nms_iou": "high"}}, "task_config.post", "nms_iou must be a number in [0, 1]"),
    ("physis_fracture", {"operating_threshold": 1.2}, "task_config.operating_threshold", "less than or equal to 1"),
    ("spine_bmd", {"min_slices": 0}, "task_config.min_slices", "greater than or equal to 1"),
    ("knee_bone_seg", {"threshold": 0.0}, "task_config.threshold", "greater than 0"),
    ("knee_bone_seg", {"planes": ["oblique"]}, "task_config.planes.0", "fix: give a valid value"),
    ("knee_bone_seg", {"min_slices": 0}, "task_config.min_slices", "greater than or equal to 1"),
    ("knee_bone_seg", {"norm_std": -1}, "task_config.norm_std", "greater than 0"),
])
def test_a_bad_setting_fails_at_load(tmp_path: Path, task: str, task_config: dict, key: str, words: str) -> None:
    d = _tiny_bundle(tmp_path, task, task_config)
    for load in (read_meta, load_bundle):
        with pytest.raises(BundleError) as info:
            load(d)
        msg = str(info.value)
        assert "\n" not in msg and str(d) in msg and key in msg and words in msg and "fix:" in msg, msg
    # the serving path refuses it too (a pinned bundle), before any study is read
    with pytest.raises(BundleError, match=key):
        load_model(task, model_dir=d, models_dir=tmp_path)


def test_a_misspelt_key_fails_at_load_naming_the_known_ones(tmp_path: Path) -> None:
    d = _tiny_bundle(tmp_path, "wrist_fracture", {"treshold": 0.4})
    with pytest.raises(BundleError) as info:
        read_meta(d)
    msg = str(info.value)
    assert "\n" not in msg and str(d) in msg
    assert "task_config.treshold: unknown setting" in msg and "correct the spelling or remove it" in msg
    assert "threshold" in msg.split("known:")[1]


def test_a_bad_setting_is_never_written(tmp_path: Path) -> None:
    meta = BundleMeta(task="spine_bmd", version="t1", architecture="none", task_config={"slices_per_vertebra": 0})
    with pytest.raises(BundleError, match="task_config.slices_per_vertebra"):
        save_bundle(tmp_path / "b", meta, {"w": torch.zeros(1)}, "card")
    assert not (tmp_path / "b").exists()


def test_a_good_edit_loads_typed(tmp_path: Path) -> None:
    src = _current("hrpqct_motion")
    d = tmp_path / "hrpqct_motion" / "edited"
    shutil.copytree(src, d)
    raw = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
    raw["task_config"]["rescan_threshold"] = 0.4
    (d / BUNDLE_JSON).write_text(json.dumps(raw), encoding="utf-8")
    s = settings_of(read_meta(d), HrpqctMotionSettings)
    assert s.rescan_threshold == 0.4 and s.aggregation == "expected" and len(s.grade_cutpoints or ()) == 4


def test_tasks_without_a_settings_model_are_not_checked(tmp_path: Path) -> None:
    d = _tiny_bundle(tmp_path, "some_plugin_task", {"anything": 1})
    assert read_meta(d).task_config == {"anything": 1}


def test_physis_and_spine_helpers_still_work() -> None:
    post = PhysisFractureSettings(operating_threshold=0.7).post_config()
    assert post.threshold == 0.7
    assert SpineBmdSettings(class_log_offsets=(0.0, 1.0, 2.0)).params().class_log_offsets == (0.0, 1.0, 2.0)


def _edited_copy(tmp_path: Path, task: str, **changes: object) -> Path:
    """A copy of the shipped bundle of ``task`` with ``changes`` written into its ``task_config``."""
    d = tmp_path / task / "edited"
    shutil.copytree(_current(task), d)
    raw = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
    raw["task_config"].update(changes)
    (d / BUNDLE_JSON).write_text(json.dumps(raw), encoding="utf-8")
    return d


def test_knee_serving_reads_its_settings_from_task_config(tmp_path: Path) -> None:
    """The knee task takes min_slices / planes from task_config (input.extra's old copy is not read)."""
    from inference.errors import TaskError
    from inference.series import read_datasets
    from inference.tasks import TaskContext, get_task
    from tests.unit.knee_phantom import write_knee_study

    write_knee_study(tmp_path / "study", 0, 3, n_slices=20, rows=48, cols=48)
    datasets = read_datasets([tmp_path / "study"])
    task = get_task("knee_bone_seg")
    extra = read_meta(_current("knee_bone_seg")).input.extra
    assert extra.get("min_slices") == 20  # the shipped bundle still carries the old copy, which must be ignored
    with pytest.raises(TaskError, match="20 slices < 30"):
        task(datasets, TaskContext(model_dir=_edited_copy(tmp_path, "knee_bone_seg", min_slices=30), device="cpu"))
    with pytest.raises(TaskError, match="coronal plane, need sagittal"):
        task(datasets, TaskContext(model_dir=_edited_copy(tmp_path / "b", "knee_bone_seg", planes=["sagittal"]),
                                   device="cpu"))


def test_physis_serving_reads_its_post_processing_from_task_config(tmp_path: Path) -> None:
    """The served operating point is the task setting's (the network args hold no post-processing copy)."""
    from inference.tasks import TaskContext, get_task
    from tests.plugins.bone_test_task import dx_dataset

    study = "1.2.826.0.1.3680043.8.498.36"
    images = [dx_dataset(study, study + ".1", 0, rows=96, cols=80)]
    d = _edited_copy(tmp_path, "physis_fracture", operating_threshold=0.987)
    findings = get_task("physis_fracture")(images, TaskContext(model_dir=d, device="cpu"))
    assert {c.threshold for c in findings.classifications} == {0.987}
    raw = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
    raw["init_args"]["post"] = {"threshold": 0.1}  # an older bundle's copy in the network args is not read
    (d / BUNDLE_JSON).write_text(json.dumps(raw), encoding="utf-8")
    findings = get_task("physis_fracture")(images, TaskContext(model_dir=d, device="cpu"))
    assert {c.threshold for c in findings.classifications} == {0.987}
