"""The import rule dicomnode -> inference <- training (pyproject [tool.importlinter]) holds, checked by import-linter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    if not exe.exists():
        pytest.fail("lint-imports is missing: install the dev extras (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(exe), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_kept() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "3 kept, 0 broken" in res.stdout


def test_a_training_import_of_dicomnode_breaks_the_contract(tmp_path: Path) -> None:
    """The contract can fail: a copy of the packages with one forbidden import is reported."""
    import shutil

    for pkg in ("dicomnode", "inference", "training"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "training" / "bad_import.py").write_text("from dicomnode.archive import TrainingArchive\n")
    res = _lint_imports(tmp_path)
    assert res.returncode != 0
    assert "training never imports dicomnode BROKEN" in res.stdout


@pytest.mark.parametrize(("module", "line"), [
    ("store/bad_import.py", "from dicomnode.jobs import JobQueue\n"),  # the store imports a stage
    ("jobs_bad.py", "from dicomnode.scp import build_ae\n"),  # a stage imports the network edge
])
def test_a_store_or_stage_import_upwards_breaks_the_layers(tmp_path: Path, module: str, line: str) -> None:
    """The dicomnode layers contract can fail."""
    import shutil

    for pkg in ("dicomnode", "inference", "training"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    if module == "jobs_bad.py":
        target = tmp_path / "dicomnode" / "jobs.py"
        target.write_text(target.read_text() + line)
    else:
        (tmp_path / "dicomnode" / module).write_text(line)
    res = _lint_imports(tmp_path)
    assert res.returncode != 0
    assert "dicomnode layers: network edge -> stages -> store BROKEN" in res.stdout
