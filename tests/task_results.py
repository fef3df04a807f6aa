"""One synthetic study per task and the result objects the shipped bundles make of it, built once per test run.

The studies come from ``dicomnode-train synth`` and the results from :func:`dicomnode.analyze.analyze` (the node's
own code path) with the bundles under ``models/``. Shared by the SR validator and the OHIF browser tests.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from tests.shipped import ROOT

TASKS = ("wrist_fracture", "physis_fracture", "hrpqct_motion", "spine_bmd", "knee_bone_seg")
# seeds whose study gives every kind of finding the task can report (physis: boxes; spine: vertebrae)
SEEDS = {"wrist_fracture": 11, "physis_fracture": 11, "hrpqct_motion": 11, "spine_bmd": 11, "knee_bone_seg": 11}


@dataclass
class TaskResult:
    """A source study and the result files of one task run."""

    task: str
    study_uid: str
    sources: list[Path]
    results: dict[str, list[Path]] = field(default_factory=dict)  # modality (SR, SEG, OT) -> files

    @property
    def sr(self) -> Path:
        """The one SR file."""
        (path,) = self.results["SR"]
        return path


@functools.cache
def task_results() -> dict[str, TaskResult]:
    """Build (once per process) a study and its results for every task, in a temporary folder."""
    import torch

    from dicomnode.analyze import analyze
    from training.cli import main as train_main

    torch.set_num_threads(2)
    keep = os.environ.get("BONE_TASK_RESULTS")  # a folder to keep (and reuse) the studies and results in
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="task-results-"))
    if not keep:
        atexit.register(shutil.rmtree, root, True)
    out: dict[str, TaskResult] = {}
    for task in TASKS:
        src, dst = root / "src" / task, root / "out" / task
        if keep and dst.is_dir() and any(dst.glob("SR_*.dcm")):
            out[task] = _collect(task, src, sorted(dst.glob("*.dcm")))
            continue
        if train_main(["synth", task, "--out", str(src), "--n", "1", "--seed", str(SEEDS[task]),
                       "--workers", "1"]) != 0:
            raise RuntimeError(f"dicomnode-train synth {task} failed")
        out[task] = _collect(task, src, analyze(src, task, dst, models_dir=ROOT / "models", device="cpu"))
    return out


def _collect(task: str, src: Path, written: list[Path]) -> TaskResult:
    sources = sorted(src.rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID)
    result = TaskResult(task, study_uid, sources)
    for path in written:
        modality = str(pydicom.dcmread(path, stop_before_pixels=True).Modality)
        result.results.setdefault(modality, []).append(path)
    return result
