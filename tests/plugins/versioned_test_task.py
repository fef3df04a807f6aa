"""``test_task_v`` (test-only): ``test_task`` that runs with the registry's current bundle and reports its version.

Each run loads the task's promoted model the way real tasks do
(:func:`inference.registry.load_model`, hot-swapped when ``current`` moves),
holds it for the whole (optionally slow) run and puts its version in the
findings, so the result objects and the job's ``model_version`` show which
bundle a job used. With ``BONE_TEST_TASK_MARK_DIR`` set, a run writes
``<dir>/<study UID>`` (the version) once it holds its model. The tiny network ``bone_test_scale`` is registered here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from pydicom import Dataset

from inference.bundle import BundleMeta, save_bundle
from inference.findings import Findings
from inference.nets import NETWORKS
from inference.registry import load_model
from inference.tasks import TaskContext, register_task
from tests.plugins.bone_test_task import run_test_task

TASK_NAME = "test_task_v"
ARCH = "bone_test_scale"


class Scale(torch.nn.Module):
    """y = w * x; one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w * x


NETWORKS.setdefault(ARCH, Scale)


def make_bundle(folder: Path, version: str, weight: float) -> Path:
    """A valid bundle of ``test_task_v`` at ``folder`` (to promote into a registry)."""
    model = Scale()
    with torch.no_grad():
        model.w.fill_(weight)
    return save_bundle(folder, BundleMeta(task=TASK_NAME, version=version, architecture=ARCH), model.state_dict(),
                       "test bundle")


def run_versioned_task(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """``test_task``'s findings with ``algorithm_version`` = the version of the model this run held."""
    loaded = load_model(TASK_NAME, models_dir=context.models_dir, model_dir=context.model_dir,
                        device=context.device)
    marks = os.environ.get("BONE_TEST_TASK_MARK_DIR")
    if marks:  # tell the test this run holds its model now: <dir>/<study UID> = version
        (Path(marks) / str(datasets[0].StudyInstanceUID)).write_text(loaded.version, encoding="utf-8")
    findings = run_test_task(datasets, context)  # slow under BONE_TEST_TASK_SLEEP_S, holding ``loaded``
    return dataclasses.replace(findings, task=TASK_NAME, algorithm_name="bone test task v",
                               algorithm_version=loaded.version)


register_task(TASK_NAME, run_versioned_task)
