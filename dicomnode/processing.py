"""The one study-processing path: source datasets -> task -> Findings -> result objects.

Both the node's workers and ``dicomnode analyze`` call :func:`process_study`, so
the offline results equal the node's.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

from pydicom import Dataset

from dicomnode.errors import TaskError
from dicomnode.results import ResultContext
from inference.findings import Findings
from inference.series import read_datasets
from inference.tasks import TaskContext, get_task

log = logging.getLogger(__name__)

__all__ = ["load_builder", "process_study"]


def load_builder() -> Callable[[Findings, Sequence[Dataset], ResultContext], list[Dataset]]:
    """Return :func:`dicomnode.results.builder.build_results` (imported lazily)."""
    return importlib.import_module("dicomnode.results.builder").build_results


def process_study(sources: Sequence[Dataset | str | PathLike[str]], task_name: str, task_context: TaskContext,
                  result_context: ResultContext) -> tuple[Findings, list[Dataset]]:
    """Run ``task_name`` on one study and build its result objects.

    Parameters
    ----------
    sources:
        Datasets (pixel data loaded) or paths of files/folders.
    task_name:
        A registered task.
    task_context:
        Model location and device.
    result_context:
        Result series UIDs/numbers and predecessors; missing series UIDs and
        numbers are filled in by the writers.

    Returns
    -------
    (Findings, list of Dataset)

    Raises
    ------
    TaskError
        Unknown task or a failure inside it.
    ResultWriteError
        The results cannot be built.
    """
    t0 = time.monotonic()
    datasets = [s if isinstance(s, Dataset) else None for s in sources]
    paths = [Path(s) for s in sources if not isinstance(s, Dataset)]
    loaded = [d for d in datasets if d is not None] + (read_datasets(paths) if paths else [])
    if not loaded:
        raise TaskError("no DICOM datasets to process")
    t_load = time.monotonic()
    try:
        task = get_task(task_name)
    except KeyError as exc:
        raise TaskError(str(exc.args[0])) from None
    findings = task(loaded, task_context)
    t_task = time.monotonic()
    objects = load_builder()(findings, loaded, result_context)
    t_write = time.monotonic()
    findings.timings_s.update({"load": t_load - t0, "task": t_task - t_load, "write": t_write - t_task})
    log.info("task %s on study %s: %d result object(s) in %.2f s", task_name, findings.study_instance_uid,
             len(objects), t_write - t0)
    return findings, objects
