"""``dicomnode analyze``: run one task offline on a folder and write its result objects."""

from __future__ import annotations

import logging
from pathlib import Path

from dicomnode.errors import InvalidDatasetError
from dicomnode.processing import process_study
from dicomnode.results import ResultContext
from inference.series import read_datasets
from inference.tasks import TaskContext

log = logging.getLogger(__name__)

__all__ = ["analyze"]


def analyze(path: Path, task: str, out_dir: Path, model_dir: Path | None = None, models_dir: Path | None = None,
            device: str = "auto") -> list[Path]:
    """Run ``task`` on every study under ``path``; write SR/SEG/SC files into ``out_dir``.

    Returns
    -------
    list of Path
        The files written, named ``<modality>_<sop uid>.dcm``.

    Raises
    ------
    InvalidDatasetError
        When ``path`` holds no DICOM files.
    """
    datasets = read_datasets([Path(path)])
    if not datasets:
        raise InvalidDatasetError(f"no DICOM files found under {path}")
    studies: dict[str, list] = {}
    for ds in datasets:
        studies.setdefault(str(ds.get("StudyInstanceUID", "")), []).append(ds)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tctx = TaskContext(models_dir=Path(models_dir) if models_dir else Path("./models"),
                       model_dir=Path(model_dir) if model_dir else None, device=device)
    for study_uid, group in studies.items():
        _, objects = process_study(group, task, tctx, ResultContext())
        for ds in objects:
            target = out_dir / f"{ds.Modality}_{ds.SOPInstanceUID}.dcm"
            ds.save_as(target, enforce_file_format=True)
            written.append(target)
        log.info("study %s: wrote %d object(s)", study_uid, len(objects))
    return written
