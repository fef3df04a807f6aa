"""Registry of tasks: name -> callable from a loaded study's datasets to Findings.

A task is any object with ``name`` and ``__call__(datasets, context) -> Findings``.
The five built-in tasks register themselves when :func:`load_builtin_tasks`
imports their modules. Sites (and tests) register extra tasks through the
``plugins`` config key, which names modules imported at start-up.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import Dataset

from inference.findings import Findings

log = logging.getLogger(__name__)

BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "inference.tasks.wrist_fracture",
    "inference.tasks.physis_fracture",
    "inference.tasks.spine_bmd",
    "inference.tasks.hrpqct_motion",
    "inference.tasks.knee_bone_seg",
)


@dataclass
class TaskContext:
    """What a task run may use besides its input datasets."""

    models_dir: Path | None = None
    model_dir: Path | None = None  # explicit bundle directory, overrides the registry
    device: str = "auto"
    extra: dict[str, object] = field(default_factory=dict)


class Task(Protocol):
    """A runnable task."""

    name: str

    def __call__(self, datasets: Sequence[Dataset], context: TaskContext) -> Findings: ...


_TASKS: dict[str, Task | Callable[[Sequence[Dataset], TaskContext], Findings]] = {}


def register_task(name: str, task: Task | Callable[[Sequence[Dataset], TaskContext], Findings]) -> None:
    """Register ``task`` under ``name``, replacing an earlier registration."""
    _TASKS[name] = task


def get_task(name: str) -> Task | Callable[[Sequence[Dataset], TaskContext], Findings]:
    """Return the task registered as ``name``.

    Raises
    ------
    KeyError
        With the list of known tasks, if ``name`` is unknown.
    """
    if name not in _TASKS:
        load_builtin_tasks()
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(_TASKS)) or 'none'}") from None


def known_tasks() -> list[str]:
    """Names of every registered task (built-ins included)."""
    load_builtin_tasks()
    return sorted(_TASKS)


def load_builtin_tasks() -> None:
    """Import the built-in task modules that exist in this installation."""
    for mod in BUILTIN_TASK_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            log.debug("task module %s not present", mod)


def load_plugins(modules: Sequence[str]) -> None:
    """Import site plugin modules; each registers its tasks on import."""
    for mod in modules:
        importlib.import_module(mod)
