"""Registry of task adapters for training, by task name.

Each built-in task lives in ``training.tasks.<task>`` and calls
:func:`register_adapter` on import; :func:`get_adapter` imports it lazily.
Tests and sites may register extra adapters the same way.
"""

from __future__ import annotations

import importlib
import logging

from training.adapter import TaskAdapter

log = logging.getLogger(__name__)

BUILTIN_TASKS: tuple[str, ...] = ("wrist_fracture", "physis_fracture", "spine_bmd", "hrpqct_motion", "knee_bone_seg")

_ADAPTERS: dict[str, TaskAdapter] = {}

__all__ = ["BUILTIN_TASKS", "get_adapter", "known_adapters", "register_adapter"]


def register_adapter(adapter: TaskAdapter) -> TaskAdapter:
    """Register ``adapter`` under ``adapter.name`` (replacing an earlier one) and return it."""
    if not getattr(adapter, "name", ""):
        raise ValueError("a task adapter needs a non-empty name")
    _ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> TaskAdapter:
    """The adapter of task ``name``, importing ``training.tasks.<name>`` on first use.

    Raises
    ------
    KeyError
        With the known task names, if there is no such adapter.
    """
    if name not in _ADAPTERS and name.isidentifier():
        try:
            importlib.import_module(f"training.tasks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"training.tasks.{name}":
                raise
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise KeyError(f"no training adapter for task {name!r}; known: {', '.join(known_adapters()) or 'none'}") from None


def known_adapters() -> list[str]:
    """Names of registered adapters plus the built-in task modules present in this installation."""
    for name in BUILTIN_TASKS:
        if name not in _ADAPTERS:
            try:
                importlib.import_module(f"training.tasks.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"training.tasks.{name}":
                    raise
    return sorted(_ADAPTERS)
