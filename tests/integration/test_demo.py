"""The README's main job in reduced form: ``scripts/demo.py --no-wait --per-task 1``, run twice from another folder.

One synthetic study per task goes through a real Orthanc and ``dicomnode serve`` with the shipped demo bundles;
every task's SR (downloaded back from Orthanc by the demo into ``<out>/results``) must name its study. The table
reads like a report (accession and patient, the full finding, the synthetic truth), ``<out>/index.html`` and
``viewer.txt`` link every study, and the second run, which has nothing to process, says so.
Skipped only when a demo bundle ``models/<task>/current`` is missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.integration.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
from demo_report import finding_text  # noqa: E402

pytestmark = pytest.mark.integration

TASKS = ("wrist_fracture", "physis_fracture", "spine_bmd", "hrpqct_motion", "knee_bone_seg")
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
TIMEOUT_S = 900
# words every task's key finding carries, whether the SR states a summary (the one wording with the operating
# point) or only coded groups; the table must show the SR's finding in full (the old table cut it at 90 characters)
FINDING = {
    "wrist_fracture": r"(?i)p=0\.\d\d.*fracture|fracture.*p=0\.\d\d",
    "physis_fracture": r"(?i)(growth.plate|physis).*p=0\.\d\d|p=0\.\d\d.*(growth.plate|physis)",
    "spine_bmd": r"(?i)L1.*L4.*\d+ HU",
    "hrpqct_motion": r"(?i)motion grade [1-5].*rescan",
    "knee_bone_seg": r"(?i)femur \d+(\.\d)? mL.*tibia \d+(\.\d)? mL.*fibula \d+(\.\d)? mL",
}
TRUTH = {
    "wrist_fracture": r"(no fracture|fracture)$",
    "physis_fracture": r"(fracture visible on \d of \d images|no visible fracture.*)$",
    "spine_bmd": r"\(lowest of L1-L4\); L1 \w+ \d+ HU, L2 .*L4 \w+ \d+ HU$",
    "hrpqct_motion": r"(radius|tibia) motion grade [1-5]",
    "knee_bone_seg": r"femur \d+ mL, tibia \d+ mL, fibula \d+ mL$",
}


def _identity(folder: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(sorted(folder.rglob("*.dcm"))[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.AccessionNumber)


def _rows(stdout: str) -> dict[str, str]:
    """Accession -> the table's lines for that study, joined (finding and truth columns unwrapped apart)."""
    lines = stdout[stdout.index("study (patient)"):].splitlines()
    rows: dict[str, list[str]] = {}
    current = None
    for line in lines[2:]:
        if not line.strip():
            break
        m = re.match(r"(A\d{9}) ", line)
        if m:
            current = m.group(1)
        if current:
            rows.setdefault(current, []).append(line)
    return {k: "\n".join(v) for k, v in rows.items()}


def _columns(block: str, header: str) -> tuple[str, str]:
    """The finding and truth columns of one study's lines, each unwrapped into one string."""
    start_f = header.index("AI finding")
    start_t = header.index("synthetic truth")
    find = " ".join(line[start_f:start_t].strip() for line in block.splitlines())
    truth = " ".join(line[start_t:].strip() for line in block.splitlines())
    return " ".join(find.split()), " ".join(truth.split())


def _run(out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "--no-wait", "--per-task", "1",
                           "--timeout", str(TIMEOUT_S - 300), "--out", str(out)], cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_demo_reduced(tmp_path: Path) -> None:
    missing = [t for t in TASKS if not (REPO_ROOT / "models" / t / "current").exists()]
    if missing:
        pytest.skip(f"demo bundles not committed yet: models/<task>/current missing for {', '.join(missing)}")
    from dicomnode.devpacs import ORTHANC_BIN

    if not Path(ORTHANC_BIN).exists():
        pytest.skip(f"Orthanc binary not found at {ORTHANC_BIN}")
    out = tmp_path / "demo"
    elsewhere = tmp_path / "elsewhere"  # a new user's folder, not the checkout
    elsewhere.mkdir()
    proc = _run(out, elsewhere)
    log = (out / "node.log").read_text(errors="replace")[-6000:] if (out / "node.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}\n--- node log ---\n{log}"
    assert "stopped" in proc.stdout and "timeout" not in proc.stdout

    sent: dict[str, tuple[str, str]] = {}  # study UID -> (task, accession)
    for task in TASKS:
        folders = sorted(p for p in (out / "studies" / task).iterdir() if p.is_dir() and any(p.rglob("*.dcm")))
        assert folders, f"no synthetic study for {task}"
        uid, accession = _identity(folders[0])
        sent[uid] = (task, accession)

    # the table: each study by accession (not a UID tail), the full finding and the synthetic truth beside it
    header = next(line for line in proc.stdout.splitlines() if line.startswith("study (patient)"))
    rows = _rows(proc.stdout)
    findings: dict[str, str] = {}
    assert not re.search(r"\.\.\.\d{6}", proc.stdout)
    for uid, (task, accession) in sent.items():
        block = rows[accession]
        assert f" {task} " in block.splitlines()[0] and re.search(r" \d+\.\ds  ", block.splitlines()[0]), block
        assert re.match(r"\S.*\((F|M), \d+ [ymwd]\)", block.splitlines()[1]), block  # patient alias
        finding, truth = _columns(block, header)
        assert re.search(FINDING[task], finding), (task, finding)
        assert re.search(TRUTH[task], truth), (task, truth)
        findings[uid] = finding

    # demo-out: the viewer's address and a link per study
    index = (out / "index.html").read_text()
    text = (out / "viewer.txt").read_text()
    assert re.search(r"Orthanc Explorer: http://127\.0\.0\.1:\d+/app/explorer\.html", text)
    assert len(re.findall(r'href="http://127\.0\.0\.1:\d+/app/explorer\.html#study\?uuid=[0-9a-f-]{44}"',
                          index)) == len(sent)
    for _task, accession in sent.values():
        assert accession in index and accession in text
    if "OHIF viewer: http" in text:  # dicomnode.viewer and the OHIF web app are installed
        for uid in sent:
            assert f"/viewer?StudyInstanceUIDs={uid}" in index, uid
    else:
        assert "OHIF viewer: not available (" in text

    srs: dict[str, list[pydicom.Dataset]] = {}
    for f in sorted((out / "results").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if str(ds.SOPClassUID).startswith(SR_PREFIX):
            srs.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    for uid, (task, _) in sent.items():
        assert uid in srs, f"no SR from Orthanc for the {task} study"
        assert any(task in str(ds.SeriesDescription) for ds in srs[uid]), task
        full = " ".join(finding_text(pydicom.dcmread(srs[uid][0].filename)).split())
        assert findings[uid] == full, (task, findings[uid], full)  # the whole finding, wrapped, not cut
    assert len(list((out / "overlays").glob("*.png"))) >= 1

    # a second run into the same folder has nothing to process, and says so instead of inventing latencies
    t0 = time.monotonic()
    again = _run(out, elsewhere)
    assert again.returncode == 0, f"{again.stdout[-6000:]}\n{again.stderr[-3000:]}"
    assert "Nothing was reprocessed: all 5 studies already have AI results" in again.stdout
    rows2 = _rows(again.stdout)
    for task, accession in sent.values():
        first = rows2[accession].splitlines()[0]
        assert re.search(rf" {task} +earlier  ", first) and not re.search(r" \d+\.\ds  ", first), first
        assert _columns(rows2[accession], header) == _columns(rows[accession], header)
    assert time.monotonic() - t0 < 120
