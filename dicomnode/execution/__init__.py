"""Where a job's task runs: in the node's own process (``local``) or on Ray actors (``ray``).

The node stays the only DICOM endpoint: it reads the spooled instances, the
engine turns them into :class:`~inference.findings.Findings`, and the result
writers run on the node. ``local`` is today's in-process call and imports no
Ray; ``ray`` needs the ``[cluster]`` extra (see :mod:`dicomnode.execution.ray_engine`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from os import PathLike
from typing import Protocol

from pydicom import Dataset

from dicomnode.config import Config
from dicomnode.processing import process_study
from dicomnode.results import ResultContext
from inference.findings import Findings
from inference.tasks import TaskContext

log = logging.getLogger(__name__)

__all__ = ["Engine", "LocalEngine", "close_engines", "engine_for", "status_lines", "stop_waiting"]


class Engine(Protocol):
    """Runs one study's task and builds its result objects on the node."""

    def process_study(self, sources: Sequence[Dataset | str | PathLike[str]], task_name: str,
                      task_context: TaskContext, result_context: ResultContext) -> tuple[Findings, list[Dataset]]:
        """Same contract as :func:`dicomnode.processing.process_study`."""
        ...

    def close(self) -> None:
        """Release processes and connections."""
        ...


class LocalEngine:
    """Today's behaviour: the task runs in the calling worker thread."""

    def process_study(self, sources: Sequence[Dataset | str | PathLike[str]], task_name: str,
                      task_context: TaskContext, result_context: ResultContext) -> tuple[Findings, list[Dataset]]:
        """Call :func:`dicomnode.processing.process_study` directly."""
        return process_study(sources, task_name, task_context, result_context)

    def close(self) -> None:
        """Nothing to release."""


_ENGINES: dict[int, tuple[Config, Engine]] = {}
_LOCK = threading.Lock()


def engine_for(cfg: Config) -> Engine:
    """The engine of ``cfg.execution`` (one per config object, created on first use)."""
    with _LOCK:
        held = _ENGINES.get(id(cfg))
        engine = held[1] if held is not None and held[0] is cfg else None
        if engine is None:
            if cfg.execution.engine == "ray":
                from dicomnode.execution.ray_engine import RayEngine

                engine = RayEngine(cfg)
            else:
                engine = LocalEngine()
            _ENGINES[id(cfg)] = (cfg, engine)
        return engine


def stop_waiting() -> None:
    """Node shutdown, first step: jobs waiting for an engine give up at once (back to pending, no attempt used)."""
    with _LOCK:
        engines = [engine for _, engine in _ENGINES.values()]
    for engine in engines:
        stop = getattr(engine, "stop_waiting", None)
        if callable(stop):
            stop()


def close_engines() -> None:
    """Close every engine made by :func:`engine_for` (at node shutdown)."""
    with _LOCK:
        engines = list(_ENGINES.values())
        _ENGINES.clear()
    for _, engine in engines:
        try:
            engine.close()
        except Exception:  # noqa: BLE001 - shutdown is best effort
            log.warning("closing execution engine failed", exc_info=True)


def status_lines(cfg: Config) -> list[str]:
    """``dicomnode status`` lines for the Ray engine (its last written state); none for ``local``."""
    if cfg.execution.engine != "ray":
        return []
    import json
    from pathlib import Path

    try:
        state = json.loads((Path(cfg.node.storage_dir) / "execution-state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return [f"execution engine: ray at {cfg.execution.address} (no state written yet)"]
    line = f"execution engine: ray at {cfg.execution.address}: {state.get('state')}"
    if state.get("waiting_jobs"):
        line += f" ({state['waiting_jobs']} job(s) waiting; {state.get('reason') or 'cluster unreachable'})"
    return [line]
