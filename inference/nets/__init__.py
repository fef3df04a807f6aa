"""Network definitions (torch ``nn.Module``s) for the five tasks, and their registry.

A bundle's ``bundle.json`` stores ``architecture`` (a key of :data:`NETWORKS`)
and its JSON-serialisable ``init_args``; :func:`build_network` rebuilds the
module from them. Nothing here downloads weights.

==========================  ===========================================================  ===============
architecture                builder                                                      task
==========================  ===========================================================  ===============
``resnet_classifier``       :class:`inference.nets.resnet.ResNetClassifier`              wrist, physis
``mobilenet_v2_classifier`` :class:`inference.nets.resnet.MobileNetV2Classifier`         physis baseline
``physis_detector``         :func:`inference.nets.detection.build_physis_detector`       physis
``physis_two_stage``        :class:`inference.nets.physis_two_stage.PhysisTwoStage`      physis (bundle)
``spine_detector``          :func:`inference.nets.spine_detector.build_spine_detector`   spine_bmd
``motion_cnn``              :class:`inference.nets.hrpqct.MotionGradeCNN`                hrpqct_motion
``unet2d``                  :class:`inference.nets.unet.UNet2D`                          knee_bone_seg
==========================  ===========================================================  ===============

Builders are imported on first use, so importing this package is cheap and
``python -m inference.nets.spine_detector`` runs cleanly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from inference.errors import BundleError

__all__ = ["NETWORKS", "build_network", "count_parameters", "fp16_size_bytes"]

_BUILDERS: dict[str, tuple[str, str]] = {
    "resnet_classifier": ("inference.nets.resnet", "ResNetClassifier"),
    "mobilenet_v2_classifier": ("inference.nets.resnet", "MobileNetV2Classifier"),
    "physis_detector": ("inference.nets.detection", "build_physis_detector"),
    "physis_two_stage": ("inference.nets.physis_two_stage", "PhysisTwoStage"),
    "spine_detector": ("inference.nets.spine_detector", "build_spine_detector"),
    "motion_cnn": ("inference.nets.hrpqct", "MotionGradeCNN"),
    "unet2d": ("inference.nets.unet", "UNet2D"),
}


def _lazy(module: str, attr: str) -> Callable[..., nn.Module]:
    """A builder that imports ``module.attr`` when first called."""

    def build(**init_args: Any) -> nn.Module:
        return getattr(importlib.import_module(module), attr)(**init_args)

    build.__name__ = attr
    build.__qualname__ = attr
    build.__doc__ = f"Build :obj:`{module}.{attr}` (imported on first use)."
    return build


NETWORKS: dict[str, Callable[..., nn.Module]] = {name: _lazy(m, a) for name, (m, a) in _BUILDERS.items()}


def build_network(arch: str, /, **init_args: Any) -> nn.Module:
    """Build the network registered as ``arch`` with ``init_args`` (as stored in bundle.json).

    Raises
    ------
    BundleError
        If ``arch`` is unknown or the init args do not fit its builder.
    """
    try:
        builder = NETWORKS[arch]
    except KeyError:
        raise BundleError(f"unknown network architecture {arch!r}; known: {', '.join(sorted(NETWORKS))}") from None
    try:
        return builder(**init_args)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"invalid init args for {arch!r}: {exc}") from exc


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def fp16_size_bytes(model: nn.Module) -> int:
    """Size of the state_dict stored in fp16: 2 bytes per float element, native size for integer buffers."""
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())
