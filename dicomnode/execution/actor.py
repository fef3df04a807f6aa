"""The Ray actor that runs one task on a worker machine, its model kept warm.

Each actor holds the promoted bundle of one task through the process-wide
:func:`inference.registry.shared_cache`: it loads it once, and when a newer
version is promoted (the registry's ``current`` pointer moves) the next job
loads the new one while a job already running keeps the model it started with.
The actor receives pre-loaded datasets (pixel data inside) from Ray's object
store and returns :class:`~inference.findings.Findings`; it writes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from inference.findings import Findings
from inference.tasks import TaskContext, get_task, load_plugins

log = logging.getLogger(__name__)

__all__ = ["TaskActor"]


class TaskActor:
    """Runs ``task`` for the node; wrapped with ``ray.remote`` by the driver."""

    def __init__(self, task: str, plugins: Sequence[str], models_dir: str | None, device: str) -> None:
        load_plugins(list(plugins))
        self.task = task
        self.models_dir = models_dir
        self.device = device
        self.warm = self._warm_up()

    def _warm_up(self) -> str | None:
        """Load the task's current model now, so the first job does not pay for it; its version or None."""
        if not self.models_dir or not (Path(self.models_dir) / self.task / "current").exists():
            return None
        from inference.registry import load_model

        try:
            return load_model(self.task, models_dir=self.models_dir, device=self.device).version
        except Exception as exc:  # noqa: BLE001 - a bad bundle shows up again, with its job, in run()
            log.warning("task %s: model not warmed up: %s", self.task, exc)
            return None

    def run(self, datasets: Sequence[Dataset], context: dict[str, object]) -> Findings:
        """Run the task on ``datasets`` (resolved from the object store) and return its findings."""
        ctx = TaskContext(models_dir=Path(str(context["models_dir"])) if context.get("models_dir") else None,
                          model_dir=Path(str(context["model_dir"])) if context.get("model_dir") else None,
                          device=str(context.get("device") or self.device),
                          extra=dict(context.get("extra") or {}))  # type: ignore[call-overload]
        return get_task(self.task)(list(datasets), ctx)

    def where(self) -> dict[str, object]:
        """Host, process id and warm model versions of this actor (for tests and the benchmark)."""
        from inference.registry import shared_cache

        versions = shared_cache(self.models_dir, self.device).loaded_versions() if self.models_dir else {}
        return {"host": socket.gethostname(), "pid": os.getpid(), "versions": versions}
