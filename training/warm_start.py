"""Warm starts: a training run's initial weights taken from an existing bundle of the same task."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence

import torch

from inference.bundle import Bundle, BundleError, load_bundle
from training.adapter import TaskAdapter, TaskConfig
from training.errors import TrainError

log = logging.getLogger(__name__)

__all__ = ["load_initial_weights"]


def load_initial_weights(model: torch.nn.Module, bundle_dir: str | os.PathLike[str], adapter: TaskAdapter,
                         tcfg: TaskConfig, *, mode: str = "exact", skip: Sequence[str] = (),
                         holdout_hash: str | None = None) -> str:
    """Copy a bundle's weights into ``model`` (float32) and return a provenance note.

    ``mode="exact"`` needs the same network and copies every weight. ``mode="matching"`` copies the tensors whose
    name and shape agree and whose name matches none of the ``skip`` patterns; the others keep their fresh values.
    A pretraining bundle (:mod:`training.patch_pretrain`) made on another split than this run's (``holdout_hash``)
    is refused: it may have trained on this run's hold-out. The task config's ``after_training`` fields (operating
    points tuned after training, such as a threshold that the architecture's post-processing rules carry) do not
    make another network: the comparison takes the bundle's values of them.

    Raises
    ------
    TrainError
        If the bundle cannot be read or belongs to another task; if it holds pretraining weights made on another
        split; in exact mode if it holds another network or its weights do not fit; in matching mode if no tensor
        can be copied.
    """
    try:
        src = load_bundle(bundle_dir)
    except BundleError as exc:
        raise TrainError(f"init_from: {exc}") from exc
    if src.meta.task != adapter.name:
        raise TrainError(f"init_from: bundle {bundle_dir} is for task {src.meta.task!r}, not {adapter.name!r}")
    if src.meta.purpose == "pretraining" and holdout_hash is not None and src.meta.holdout_hash != holdout_hash:
        raise TrainError(f"init_from: pretraining bundle {bundle_dir} was made on another split (its hold-out "
                         "differs from this run's, so it may have trained on it); pretrain again on this split")
    if mode == "matching":
        return _load_matching_weights(model, src, skip)
    if skip:
        raise TrainError("init_skip needs init_mode=matching")
    arch, init_args = adapter.architecture(_with_tuned_fields(tcfg, src))
    if (src.meta.architecture, src.meta.init_args) != (arch, init_args):
        raise TrainError(f"init_from: bundle {bundle_dir} holds {src.meta.architecture} {src.meta.init_args}, "
                         f"this run builds {arch} {init_args}")
    try:
        src.load_into(model)  # float32; the training loop puts the model back in train mode
    except BundleError as exc:
        raise TrainError(f"init_from: {exc}") from exc
    log.info("%s: starting from the weights of bundle version %s", adapter.name, src.meta.version)
    return f"initialised from bundle {src.meta.task}/{src.meta.version} (weights sha256 {src.meta.weights_sha256})"


def _with_tuned_fields(tcfg: TaskConfig, src: Bundle) -> TaskConfig:
    """``tcfg`` with the source bundle's values of the ``after_training`` fields it recorded."""
    tuned = {k: v for k, v in src.meta.task_config.items() if k in tcfg.after_training}
    return tcfg.model_validate({**tcfg.model_dump(), **tuned}) if tuned else tcfg


def _load_matching_weights(model: torch.nn.Module, src: Bundle, skip: Sequence[str]) -> str:
    own = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    skipped = 0
    for name, value in src.state_dict.items():
        if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
            skipped += 1
        elif name in own and own[name].shape == value.shape:
            copied[name] = value.to(own[name].dtype) if value.is_floating_point() else value
    if not copied:
        raise TrainError(f"init_from: no weight of bundle {src.path} fits this network")
    model.load_state_dict(copied, strict=False)
    fresh = len(own) - len(copied)
    log.info("%s: copied %d of %d tensors from bundle version %s (%d fresh, %d skipped by pattern)",
             src.meta.task, len(copied), len(own), src.meta.version, fresh, skipped)
    note = (f"initialised {len(copied)} of {len(own)} tensors from bundle {src.meta.task}/{src.meta.version} "
            f"({src.meta.architecture} {src.meta.init_args}, weights sha256 {src.meta.weights_sha256}); "
            f"{fresh} started fresh")
    return note + (f" (never copied: {', '.join(skip)})" if skip else "")
