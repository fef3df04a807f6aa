"""The plug-in interface of a task: one adapter object plus its typed config.

The trainer, evaluation and promotion are written once; a task supplies only
what differs (network, pre-processing, loss, metrics, bundle metadata).
:class:`BaseAdapter` provides defaults for the optional parts.

A task module ``training/tasks/<task>.py`` looks like this::

    class WristConfig(TaskConfig):                 # every hyperparameter of the task, typed
        input_hw: tuple[int, int] = (512, 341)
        backbone: str = "resnet18"

    class WristAdapter(BaseAdapter):
        name = "wrist_fracture"
        config_model = WristConfig
        primary_metric = "study_accuracy"
        greater_is_better = True

        def architecture(self, cfg): return "resnet_classifier", {"backbone": cfg.backbone}
        def build_model(self, cfg):
            arch, init_args = self.architecture(cfg)
            return build_network(arch, **init_args)
        def preprocessor(self, cfg): return functools.partial(prepare_record, input_hw=cfg.input_hw)  # picklable
        def loss(self, outputs, batch): return F.binary_cross_entropy_with_logits(outputs[:, 0], batch["label"].float())
        def evaluate(self, model, loader, device, cfg): ...  # -> EvalResult(metrics=..., y_true=..., y_prob=...)
        def input_spec(self, cfg): return InputSpec(modality=["DX", "CR"], size=list(cfg.input_hw), ...)
        def labels(self, cfg): return [LabelSpec(name="fracture", index=0, code=...)]

    register_adapter(WristAdapter())           # from training.tasks

Samples are dicts of numpy arrays and numbers (``"image"``, ``"label"``, ...); the
dataset adds ``record_index`` so ``evaluate`` can aggregate images per study.
Class-balanced sampling (``TrainConfig.balanced_sampling``) reads ``sample["label"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from inference.bundle import InputSpec, LabelSpec
from inference.task_settings import TaskSettings
from training.data import Preprocess, Sample

__all__ = ["BaseAdapter", "EvalResult", "TaskAdapter", "TaskConfig", "move_to"]


#: base of every task's typed config: frozen, ``extra="forbid"``, with ``after_training`` (the fields read only
#: once training is over, left out of the trainer's resume fingerprint). Defined in :mod:`inference.task_settings`,
#: so that serving validates a bundle's ``task_config`` with the very classes training uses.
TaskConfig = TaskSettings


@dataclass
class EvalResult:
    """What a task's evaluation returns.

    ``metrics`` are JSON-able numbers/lists/dicts and must contain the adapter's
    ``primary_metric``. For classification tasks ``y_true`` (N,) and ``y_prob``
    ((N,) binary or (N, C)) let the evaluation draw ROC, confusion and calibration plots.
    """

    metrics: dict[str, Any]
    y_true: np.ndarray | None = None
    y_prob: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TaskAdapter(Protocol):
    """What the trainer needs from a task."""

    name: str
    config_model: type[TaskConfig]
    primary_metric: str
    greater_is_better: bool

    def architecture(self, cfg: TaskConfig) -> tuple[str, dict[str, Any]]:
        """Architecture name (as known to :func:`inference.nets.build_network`) and its init args."""
        ...

    def build_model(self, cfg: TaskConfig) -> torch.nn.Module:
        """A freshly initialised network."""
        ...

    def preprocessor(self, cfg: TaskConfig) -> Preprocess:
        """A picklable callable ``record -> list of samples`` (dicts of numpy arrays and numbers)."""
        ...

    def preprocess_signature(self, cfg: TaskConfig) -> str:
        """A string that changes whenever the pre-processing output would change (cache key)."""
        ...

    def train_transform(self, cfg: TaskConfig) -> Callable[[Sample], Sample] | None:
        """Augmentation applied to training samples (tensors), or None."""
        ...

    def collate(self, cfg: TaskConfig) -> Callable[[list[Sample]], Any] | None:
        """Collate function for the DataLoader (None: torch's default)."""
        ...

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        """Training-mode forward pass on one batch."""
        ...

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """Scalar loss of ``outputs`` against the targets in ``batch``."""
        ...

    def evaluate(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader, device: torch.device,
                 cfg: TaskConfig) -> EvalResult:
        """Metrics of ``model`` (already in eval mode) on ``loader``."""
        ...

    def input_spec(self, cfg: TaskConfig) -> InputSpec:
        """The input spec recorded in the bundle."""
        ...

    def labels(self, cfg: TaskConfig) -> list[LabelSpec]:
        """Output classes/structures with codes."""
        ...

    def reference_figures(self) -> dict[str, Any]:
        """The source document's figures, shown beside ours in ``report.md``."""
        ...

    def card_notes(self, cfg: TaskConfig) -> str:
        """Task-specific text for the model card (design choices, limits)."""
        ...


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class BaseAdapter:
    """Defaults for the optional parts of :class:`TaskAdapter`.

    The default forward moves the batch to the device and calls ``model(batch["image"])``.
    """

    name: ClassVar[str] = ""
    config_model: ClassVar[type[TaskConfig]] = TaskConfig
    primary_metric: ClassVar[str] = "loss"
    greater_is_better: ClassVar[bool] = True

    def config(self, values: dict[str, Any] | None = None) -> TaskConfig:
        """Validate a task config from a plain dict."""
        return self.config_model.model_validate(values or {})

    def preprocess_signature(self, cfg: TaskConfig) -> str:
        """Default: adapter class, its module and the full task config."""
        return f"{type(self).__module__}.{type(self).__qualname__}:{cfg.model_dump_json()}"

    def train_transform(self, cfg: TaskConfig) -> Callable[[Sample], Sample] | None:
        """No augmentation."""
        return None

    def collate(self, cfg: TaskConfig) -> Callable[[list[Sample]], Any] | None:
        """torch's default collate."""
        return None

    def forward(self, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
        """``model(batch["image"])`` with the batch moved to ``device``."""
        batch = move_to(batch, device)
        return model(batch["image"])

    def move(self, batch: Any, device: torch.device) -> Any:
        """Move every tensor in ``batch`` to ``device``."""
        return move_to(batch, device)

    def reference_figures(self) -> dict[str, Any]:
        """No reference figures."""
        return {}

    def card_notes(self, cfg: TaskConfig) -> str:
        """No extra notes."""
        return ""

    def variant_of(self, task_config: dict[str, Any]) -> str:
        """What tells this task's bundles apart in ``dicomnode-train compare`` (default: nothing, the version does)."""
        return ""

    def comparison_columns(self) -> list[str]:
        """Metrics (dotted paths into an evaluation's metrics) of a comparison table (default: the primary one)."""
        return [self.primary_metric]

    def reference_rows(self) -> dict[str, dict[str, Any]]:
        """The source document's rows of a comparison table, by name (column -> value); default: none."""
        return {}

    def tune(self, result: EvalResult, cfg: TaskConfig) -> tuple[TaskConfig, str]:
        """Operating points chosen from the trained model's validation ``result``: (config, note).

        The trainer calls this once after training, before the hold-out evaluation; the returned
        config is the one the bundle records. Default: the config unchanged, no note.
        """
        return cfg, ""
