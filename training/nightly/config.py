"""Typed config of the nightly retraining scheduler (YAML, pydantic v2, ``extra="forbid"``).

Example::

    registry_dir: /srv/dicomnode/models          # the node's models_dir
    archive_dir: /srv/dicomnode/var/training-archive
    key_dir: /srv/dicomnode/var/training-archive-keys
    incoming_labels_dir: /srv/dicomnode/incoming_labels
    device: auto
    distributed:                   # optional: train under torchrun (DDP)
      nproc_per_node: 2            # processes (GPUs) on this machine
      nnodes: 1                    # >1: same config on each machine, its own node_rank,
      # node_rank: 0               #     rdzv_endpoint: host:port of the rank-0 machine
    tasks:
      wrist_fracture:
        cron: "0 2 * * *"          # local time
        mode: fine_tune            # or scratch
        epochs: 3
        margin: 0.01               # primary metric must improve by at least this
        secondary:                 # metric -> allowed worsening (absolute)
          auc: {tolerance: 0.02}
          ece: {tolerance: 0.01, greater_is_better: false}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.errors import DicomNodeError

__all__ = ["DistributedSpec", "NightlyConfig", "cron_trigger", "NightlyConfigError", "SecondaryMetric", "TaskSchedule",
           "load_nightly_config"]


def cron_trigger(expr: str, timezone: Any = None) -> Any:
    """A CronTrigger from 5 crontab fields, or 6 with a leading seconds field (tests, sub-minute schedules)."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) == 6:
        sec, minute, hour, day, month, dow = fields
        return CronTrigger(second=sec, minute=minute, hour=hour, day=day, month=month, day_of_week=dow,
                           timezone=timezone)
    return CronTrigger.from_crontab(expr, timezone=timezone)


class NightlyConfigError(DicomNodeError):
    """The nightly config file is missing or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecondaryMetric(_Strict):
    """A metric that may not get worse than the current model's by more than ``tolerance``."""

    tolerance: float = Field(0.0, ge=0)
    greater_is_better: bool = True


class DistributedSpec(_Strict):
    """Run the nightly training under torchrun (DDP): processes on this machine, machines, rendezvous.

    Several machines: every machine runs the scheduler with the same config except ``node_rank``;
    the registry, archive and label folders must be the same shared paths on all of them.
    """

    nproc_per_node: int = Field(1, ge=1, le=64, description="training processes on this machine")
    nnodes: int = Field(1, ge=1, le=64, description="machines taking part")
    node_rank: int = Field(0, ge=0, description="this machine's rank, 0..nnodes-1 (rank 0 gates and promotes)")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rank-0 machine (needed when nnodes > 1)")

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"distributed.node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError("distributed.nnodes > 1 needs rdzv_endpoint: host:port of the rank-0 machine "
                                 f"(got {self.rdzv_endpoint!r})")
        return self

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains."""
        return self.nproc_per_node * self.nnodes > 1


class TaskSchedule(_Strict):
    """When and how one task is retrained."""

    cron: str = Field("0 2 * * *", description="crontab expression in the scheduler's local time zone")
    mode: Literal["fine_tune", "scratch"] = "fine_tune"
    epochs: int = Field(3, ge=1)
    lr: float | None = Field(None, gt=0, description="default: the current bundle's LR / 10 when fine-tuning")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    margin: float = Field(0.0, ge=0)
    secondary: dict[str, SecondaryMetric] = Field(default_factory=dict)
    min_new_labels: int = Field(0, ge=0, description="skip the run unless this many new labels arrived")
    train: dict[str, Any] = Field(default_factory=dict, description="extra TrainConfig keys")
    task: dict[str, Any] = Field(default_factory=dict, description="task config keys (scratch mode)")
    distributed: DistributedSpec | None = Field(None, description="torchrun set-up of this task (default: the "
                                                "config's top-level distributed)")

    @field_validator("cron")
    @classmethod
    def _cron_parses(cls, value: str) -> str:
        try:
            cron_trigger(value)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from exc
        return value


class NightlyConfig(_Strict):
    """The whole nightly retraining config."""

    registry_dir: Path
    archive_dir: Path
    key_dir: Path
    incoming_labels_dir: Path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    misfire_grace_time_s: int = Field(6 * 3600, ge=1, description="a run missed by less than this still runs once")
    distributed: DistributedSpec = Field(default_factory=DistributedSpec, description="torchrun set-up of every "
                                         "task's run (multi-process / multi-machine DDP)")
    plugins: list[str] = Field(default_factory=list, description="modules imported first (site task adapters)")
    tasks: dict[str, TaskSchedule] = Field(default_factory=dict)

    def distributed_for(self, task: str) -> DistributedSpec:
        """The torchrun set-up of ``task``'s runs."""
        sched = self.tasks.get(task)
        return sched.distributed if sched is not None and sched.distributed is not None else self.distributed

    def resolve_paths(self, base: Path) -> NightlyConfig:
        """Copy with relative paths resolved against ``base``."""
        fix = {k: (v if v.is_absolute() else (base / v).resolve()) for k, v in (
            ("registry_dir", self.registry_dir), ("archive_dir", self.archive_dir), ("key_dir", self.key_dir),
            ("incoming_labels_dir", self.incoming_labels_dir))}
        return self.model_copy(update=fix)


def load_nightly_config(path: str | Path) -> NightlyConfig:
    """Load and validate the YAML file; relative paths are resolved against its folder.

    Raises
    ------
    NightlyConfigError
        If the file cannot be read or is invalid.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise NightlyConfigError(f"cannot read nightly config {path}: {exc}") from exc
    try:
        cfg = NightlyConfig.model_validate(raw)
    except ValidationError as exc:
        raise NightlyConfigError(f"nightly config {path} is invalid:\n{exc}") from exc
    return cfg.resolve_paths(path.parent.resolve())
