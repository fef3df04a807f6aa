"""What a training run leaves in its work directory to be resumed: the checkpoint and the training log.

A checkpoint belongs to one run, named by :func:`fingerprint` (task, task settings without the
``after_training`` ones, training config without the run-local fields, and the split's keys); a
checkpoint of another run is refused rather than resumed. It is written atomically (with fsync,
:func:`inference.fsutil.atomic_write`) and carries the RNG states, so that on CPU with a fixed seed an
interrupted and resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.fsutil import atomic_write, atomic_write_text
from training.adapter import TaskAdapter, TaskConfig
from training.data import Split
from training.errors import TrainError
from training.train_config import TrainConfig

__all__ = ["CHECKPOINT", "TRAIN_LOG", "fingerprint", "read_checkpoint", "write_checkpoint",
           "write_train_log"]

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"

#: training-config fields that do not change what a run computes (a lease-bound run resumes under a new budget)
_RUN_LOCAL = {"num_workers", "device", "cache_dir", "version", "log_every_steps", "checkpoint_every", "time_budget_s"}


def fingerprint(adapter: TaskAdapter, tcfg: TaskConfig, cfg: TrainConfig, split: Split) -> str:
    """The identity of a run: a checkpoint with another fingerprint is not resumed."""
    payload = {"task": adapter.name, "task_cfg": tcfg.model_dump(mode="json", exclude=set(tcfg.after_training)),
               "train": cfg.model_dump(mode="json", exclude=_RUN_LOCAL),
               "train_keys": sorted(r.key for r in split.train), "val_keys": sorted(r.key for r in split.val)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(path: Path, run_fingerprint: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (model, optimiser, progress ...) with the run's fingerprint and the RNG states, atomically."""
    data = {"fingerprint": run_fingerprint, **payload, "rng": _rng_state()}
    atomic_write(path, lambda f: torch.save(data, f))


def read_checkpoint(path: Path, run_fingerprint: str) -> dict[str, Any]:
    """The checkpoint at ``path`` of the run ``run_fingerprint``, with the RNG states restored.

    Raises
    ------
    TrainError
        If the checkpoint cannot be read or belongs to another run.
    """
    try:
        ck: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a torn write cannot happen (atomic), but a foreign file can
        raise TrainError(f"cannot read checkpoint {path}: {exc}") from exc
    if ck.get("fingerprint") != run_fingerprint:
        raise TrainError(f"checkpoint {path} belongs to a different run; delete it or use another work dir")
    _set_rng_state(ck["rng"])
    return ck


def write_train_log(work_dir: Path, history: list[dict[str, Any]]) -> None:
    """Write the epochs so far as ``train_log.jsonl`` in ``work_dir``."""
    atomic_write_text(work_dir / TRAIN_LOG, "".join(json.dumps(h) + "\n" for h in history))

