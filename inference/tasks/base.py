"""What every task module shares: model lookup through one process-wide cache, source references.

A task module (``inference/tasks/<name>.py``) defines a callable
``(datasets, TaskContext) -> Findings`` and registers it with
:func:`inference.tasks.register_task`. It obtains its model with
:func:`model_for`, which honours ``context.model_dir`` (a pinned bundle, as in
``dicomnode analyze --model`` or a route's ``model:``) and otherwise returns the
registry's current version, swapped in without a restart after a promotion.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydicom import Dataset

from inference.findings import ImageRef
from inference.registry import LoadedModel, ModelCache, load_model, shared_cache

DEFAULT_MODELS_DIR = Path("models")


def model_cache(models_dir: Path, device: str = "auto") -> ModelCache:
    """The process-wide :class:`ModelCache` for ``models_dir`` on ``device`` (see :func:`shared_cache`)."""
    return shared_cache(models_dir, device)


def model_for(task: str, context: object) -> LoadedModel:
    """The model a task run uses: the pinned bundle if given, else the registry's current version.

    Raises
    ------
    ModelNotFoundError
        If no bundle is pinned and nothing is promoted for ``task``.
    BundleError
        If the pinned bundle belongs to another task.
    """
    return load_model(
        task,
        models_dir=getattr(context, "models_dir", None) or DEFAULT_MODELS_DIR,
        model_dir=getattr(context, "model_dir", None),
        device=getattr(context, "device", "auto") or "auto",
    )


def image_refs(datasets: Sequence[Dataset]) -> tuple[ImageRef, ...]:
    """One :class:`ImageRef` per source instance (frame-less), in the given order."""
    return tuple(ImageRef(str(ds.SOPInstanceUID)) for ds in datasets)
