"""The README's main job in reduced form: ``scripts/demo.py --no-wait --per-task 1``.

One synthetic study per task goes through a real Orthanc and ``dicomnode serve`` with the shipped demo bundles;
every task's SR (downloaded back from Orthanc by the demo into ``<out>/results``) must name its study.
Skipped only when a demo bundle ``models/<task>/current`` is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

TASKS = ("wrist_fracture", "physis_fracture", "spine_bmd", "hrpqct_motion", "knee_bone_seg")
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TIMEOUT_S = 900


def _study_uid(folder: Path) -> str:
    first = sorted(folder.rglob("*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def test_demo_reduced(tmp_path: Path) -> None:
    missing = [t for t in TASKS if not (REPO_ROOT / "models" / t / "current").exists()]
    if missing:
        pytest.skip(f"demo bundles not committed yet: models/<task>/current missing for {', '.join(missing)}")
    from dicomnode.devpacs import ORTHANC_BIN

    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc binary not found at {ORTHANC_BIN}")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--no-wait", "--per-task", "1",
                           "--timeout", str(TIMEOUT_S - 300), "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    log = (out / "node.log").read_text(errors="replace")[-6000:] if (out / "node.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}\n--- node log ---\n{log}"
    assert "stopped" in proc.stdout and "timeout" not in proc.stdout
    # the table shows each task's finding read back from its SR
    for pattern in (r"wrist_fracture .*Wrist fracture: (Present|Absent) \(p=0\.\d\d\)",
                    r"physis_fracture .*fracture of growth plate: (Present|Absent)",
                    r"spine_bmd .*L1 vertebra: \w+", r"hrpqct_motion .*motion artifact grade: Motion grade [1-5]",
                    r"knee_bone_seg .*Femur \d+ mL"):
        assert re.search(pattern, proc.stdout), (pattern, proc.stdout[-3000:])

    sent: dict[str, str] = {}  # study UID -> task
    for task in TASKS:
        folders = sorted(p for p in (out / "studies" / task).iterdir() if p.is_dir() and any(p.rglob("*.dcm")))
        assert folders, f"no synthetic study for {task}"
        sent[_study_uid(folders[0])] = task
    srs: dict[str, list[pydicom.Dataset]] = {}
    for f in sorted((out / "results").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if str(ds.SOPClassUID).startswith(SR_PREFIX):
            srs.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    for uid, task in sent.items():
        assert uid in srs, f"no SR from Orthanc for the {task} study"
        assert any(task in str(ds.SeriesDescription) for ds in srs[uid]), task
    assert len(list((out / "overlays").glob("*.png"))) >= 1
