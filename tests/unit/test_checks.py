"""``dicomnode check-config``: task names and promoted models beyond pydantic (dicomnode/checks.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.checks import check_routes
from dicomnode.config import load_config

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


def _write(tmp: Path, routes: str, models_dir: Path, extra: str = "") -> Path:
    cfg = tmp / "node.yaml"
    cfg.write_text(f"models_dir: {models_dir}\n{extra}routes:\n{routes}", encoding="utf-8")
    return cfg


def _cli(cfg: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", "check-config", str(cfg)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _registry_with(tmp: Path, *tasks: str) -> Path:
    reg = tmp / "models"
    for task in tasks:
        version = (MODELS / task / "current").read_text().strip()
        shutil.copytree(MODELS / task / version, reg / task / version)
        (reg / task / "current").write_text(version + "\n")
    return reg


WRIST = "  - {name: adult-wrist, task: wrist_fracture, match: {modality: [DX]}}\n"
SPINE = "  - {name: lumbar-ct, task: spine_bmd, match: {modality: [CT]}}\n"


@pytest.mark.skipif(not (MODELS / "wrist_fracture" / "current").exists(), reason="demo bundles not committed")
def test_unknown_task_fails_naming_the_route(tmp_path: Path) -> None:
    cfg = _write(tmp_path, WRIST + "  - {name: lumbar-ct, task: spine_bdm, match: {modality: [CT]}}\n",
                 _registry_with(tmp_path, "wrist_fracture"))
    out = _cli(cfg, tmp_path)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # one line: the route, the bad name, the known names and the fix
    assert "route 'lumbar-ct'" in lines[0] and "unknown task 'spine_bdm'" in lines[0]
    assert "spine_bmd" in lines[0] and "plugins" in lines[0]
    assert "config OK" not in out.stdout


@pytest.mark.skipif(not (MODELS / "wrist_fracture" / "current").exists(), reason="demo bundles not committed")
def test_route_without_promoted_model_fails_naming_the_route(tmp_path: Path) -> None:
    reg = _registry_with(tmp_path, "wrist_fracture")
    out = _cli(_write(tmp_path, WRIST + SPINE, reg), tmp_path)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "route 'lumbar-ct'" in lines[0] and "spine_bmd has no promoted model" in lines[0]
    assert f"dicomnode-train promote BUNDLE_DIR --registry {reg}" in lines[0]
    # a pointer to a version that is not there is named too
    (reg / "spine_bmd").mkdir()
    (reg / "spine_bmd" / "current").write_text("gone-1\n")
    out = _cli(_write(tmp_path, WRIST + SPINE, reg), tmp_path)
    assert out.returncode == 2 and "route 'lumbar-ct'" in out.stderr and "'gone-1' is missing" in out.stderr


@pytest.mark.skipif(not (MODELS / "spine_bmd" / "current").exists(), reason="demo bundles not committed")
def test_pinned_model_is_checked(tmp_path: Path) -> None:
    reg = _registry_with(tmp_path, "wrist_fracture", "spine_bmd")
    spine = reg / "spine_bmd" / (reg / "spine_bmd" / "current").read_text().strip()
    wrist_pinned_to_spine = f"  - {{name: pinned, task: wrist_fracture, model: {spine}}}\n"
    problems = check_routes(load_config(_write(tmp_path, wrist_pinned_to_spine, reg)))
    assert len(problems) == 1 and "route 'pinned'" in problems[0] and "spine_bmd bundle" in problems[0]
    pinned_nowhere = f"  - {{name: pinned, task: spine_bmd, model: {tmp_path / 'nothing'}}}\n"
    problems = check_routes(load_config(_write(tmp_path, pinned_nowhere, reg)))
    assert len(problems) == 1 and "not a model bundle" in problems[0]
    assert check_routes(load_config(_write(tmp_path, f"  - {{name: pinned, task: spine_bmd, model: {spine}}}\n",
                                           tmp_path / "empty"))) == []


def test_plugin_task_is_known_through_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.tasks as tasks

    # an earlier test in this process may have imported the plugin: start from a node that has not
    monkeypatch.setattr(tasks, "_TASKS", {k: v for k, v in tasks._TASKS.items() if k != "test_task"})
    monkeypatch.delitem(sys.modules, "tests.plugins.bone_test_task", raising=False)
    routes = "  - {name: site-rule, task: test_task}\n"
    problems = check_routes(load_config(_write(tmp_path, routes, tmp_path / "empty")))
    assert len(problems) == 1 and "unknown task 'test_task'" in problems[0]
    cfg = load_config(_write(tmp_path, routes, tmp_path / "empty", "plugins: [tests.plugins.bone_test_task]\n"))
    assert check_routes(cfg) == []  # a plugin task may need no bundle; it is not asked for one


@pytest.mark.skipif(not (MODELS / "wrist_fracture" / "current").exists(), reason="demo bundles not committed")
def test_shipped_config_passes_and_prints_routes(tmp_path: Path) -> None:
    out = _cli(REPO / "config" / "node.yaml", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "config OK" in out.stdout and "knee-mr-bones: task knee_bone_seg" in out.stdout
    meta = json.loads((MODELS / "knee_bone_seg" / (MODELS / "knee_bone_seg" / "current").read_text().strip()
                       / "bundle.json").read_text())
    assert meta["task"] == "knee_bone_seg"
