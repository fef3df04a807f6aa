"""The hyperparameters every task shares (:class:`TrainConfig`, re-exported by :mod:`training.trainer`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.data import SplitConfig

__all__ = ["TrainConfig"]


class TrainConfig(BaseModel):
    """Hyperparameters shared by every task."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["none", "plateau", "cosine", "step"] = "none"
    step_size: int = Field(10, ge=1, description="epochs between LR drops (schedule=step)")
    gamma: float = Field(0.1, gt=0, le=1, description="LR factor (step and plateau)")
    plateau_patience: int = Field(5, ge=0)
    min_lr: float = Field(0.0, ge=0)
    early_stopping_patience: int | None = Field(None, ge=1)
    amp: bool = True
    seed: int = 0
    balanced_sampling: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (also used to pre-process)")
    checkpoint_every: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap for quick runs and tests")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop after an epoch when one more epoch of the same length would pass this many "
        "seconds of training (the best epoch so far is kept; for fixed-length leases such as a borrowed GPU)")
    eval_batch_size: int | None = Field(None, ge=1)
    split: SplitConfig = Field(default_factory=SplitConfig)
    cache_dir: Path | None = None
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+-]+$")
    fp16_weights: bool = False
    synthetic_only: bool | None = Field(None, description="None: true when every manifest row says synthetic")
    log_every_steps: int = Field(50, ge=1)
    init_from: Path | None = Field(
        None, description="start from the weights of this bundle (same task and network; fine-tuning or a nightly "
        "warm start); its version and weights SHA-256 are recorded in the new bundle's notes")
    init_mode: Literal["exact", "matching"] = Field(
        "exact", description="exact: init_from must hold the same network and every weight is copied; matching: "
        "copy only the tensors whose name and shape agree (e.g. a shared trunk into another backbone variant of the "
        "same task), the rest keep their fresh initialisation")
    init_skip: list[str] = Field(
        default_factory=list, description="fnmatch patterns of weight names that are never copied from init_from "
        "(start those modules fresh, e.g. 'backbone.body.attn_*'); only with init_mode=matching")
    channels_last: bool = Field(True, description="train 2-D conv nets in channels-last memory (faster on CUDA and "
                                "on the oneDNN CPU path; the saved weights are the same)")

    @model_validator(mode="after")
    def _skip_needs_matching(self) -> TrainConfig:
        if self.init_skip and self.init_mode != "matching":
            raise ValueError("init_skip needs init_mode=matching")
        return self
