"""A second deterministic test task, ``test_task_b`` (test-only): ``test_task`` under another name.

Used where a test needs studies of two tasks (e.g. one Ray actor per task).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pydicom import Dataset

from inference.findings import Findings
from inference.tasks import TaskContext, register_task
from tests.plugins.bone_test_task import run_test_task

TASK_NAME = "test_task_b"


def run_second_task(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """``test_task``'s findings, relabelled as ``test_task_b``."""
    return dataclasses.replace(run_test_task(datasets, context), task=TASK_NAME, algorithm_name="bone test task b")


register_task(TASK_NAME, run_second_task)
