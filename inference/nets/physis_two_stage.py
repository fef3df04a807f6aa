"""The physis fracture model as one module: detector + crop classifier + whole-image classifier.

One bundle holds every sub-network the chosen method needs, so a single
``weights.pt``/``bundle.json`` pair describes the whole pipeline:

==============  ==================================================================
method          sub-networks
==============  ==================================================================
``two_stage``   ``detector`` (fracture/metal/text boxes), ``crop_classifier``
                (fracture crops with margin) and ``image_classifier`` (fallback
                when nothing is detected). The same bundle also scores the two
                baselines, so one run gives all three methods on the same split.
``classifier``  ``image_classifier`` only (whole-image ResNet50 baseline).
``detector``    ``detector`` only (detector baseline: image score = top fracture box).
==============  ==================================================================

The module only holds the networks and their geometry (``det_long_side``,
``image_size``, ``crop_size``); the post-processing rules and their thresholds
are in :mod:`inference.tasks.physis_fracture_post` and are task settings
(:class:`inference.task_settings.PhysisFractureSettings`, the bundle's ``task_config``).

Faithful: Faster R-CNN ResNet50-FPN detector and ResNet50 classifiers (~135 MB
fp16). Light (demo bundles, 25 MB cap): ``PHYSIS_LIGHT_ARGS`` detector and two
ResNet18 classifiers without layer4 (~21.4 MB fp16), the same design.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from inference.nets.detection import PHYSIS_LIGHT_ARGS, build_physis_detector
from inference.nets.resnet import ResNetClassifier

__all__ = ["METHODS", "PhysisTwoStage", "physis_init_args"]

METHODS: tuple[str, ...] = ("two_stage", "classifier", "detector")

_FAITHFUL_CLASSIFIER: dict[str, Any] = {"backbone": "resnet50", "in_channels": 1, "num_outputs": 1}
_LIGHT_CLASSIFIER: dict[str, Any] = {"backbone": "resnet18", "stages": 3, "in_channels": 1, "num_outputs": 1}


def physis_init_args(method: str = "two_stage", *, variant: str = "faithful", kind: str = "faster_rcnn",
                     det_long_side: int = 1024, image_size: int = 512, crop_size: int = 224) -> dict[str, Any]:
    """JSON init args of :class:`PhysisTwoStage` for a method and a variant ('faithful' or 'light')."""
    if variant not in ("faithful", "light"):
        raise ValueError(f"variant must be 'faithful' or 'light', got {variant!r}")
    det: dict[str, Any] = {"kind": kind, "backbone": "resnet50", "in_channels": 1}
    if variant == "light":
        det.update(PHYSIS_LIGHT_ARGS)
    det.update(min_size=det_long_side, max_size=det_long_side)
    cls = dict(_LIGHT_CLASSIFIER if variant == "light" else _FAITHFUL_CLASSIFIER)
    return {"method": method, "variant": variant, "detector": det, "crop_classifier": dict(cls),
            "image_classifier": dict(cls), "det_long_side": det_long_side, "image_size": image_size,
            "crop_size": crop_size}


class PhysisTwoStage(nn.Module):
    """Container of the physis sub-networks (see the module docstring).

    Parameters
    ----------
    method : str
        'two_stage', 'classifier' or 'detector'; decides which sub-networks exist.
    variant : str
        'faithful' or 'light' (recorded only; the sub-network args say what is built).
    detector, crop_classifier, image_classifier : dict
        Init args of :func:`build_physis_detector` and :class:`ResNetClassifier`.
    det_long_side : int
        Square letterbox side of the detector input (>= 1024 faithful).
    image_size : int
        Square letterbox side of the whole-image classifier input.
    crop_size : int
        Square side the crops are letterboxed to.
    post : dict
        Ignored: bundles written before the post-processing rules became task settings carry a copy
        here; serving reads them from ``task_config`` only.
    """

    def __init__(self, method: str = "two_stage", variant: str = "faithful", detector: dict[str, Any] | None = None,
                 crop_classifier: dict[str, Any] | None = None, image_classifier: dict[str, Any] | None = None,
                 det_long_side: int = 1024, image_size: int = 512, crop_size: int = 224,
                 post: dict[str, Any] | None = None) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if min(det_long_side, image_size, crop_size) < 32:
            raise ValueError("det_long_side, image_size and crop_size must be >= 32")
        self.method = method
        self.variant = variant
        self.det_long_side = int(det_long_side)
        self.image_size = int(image_size)
        self.crop_size = int(crop_size)
        self.detector: nn.Module | None = None
        self.crop_classifier: nn.Module | None = None
        self.image_classifier: nn.Module | None = None
        if method in ("two_stage", "detector"):
            args = {"in_channels": 1, "min_size": det_long_side, "max_size": det_long_side, **(detector or {})}
            self.detector = build_physis_detector(**args)
        if method == "two_stage":
            self.crop_classifier = ResNetClassifier(**(crop_classifier or _FAITHFUL_CLASSIFIER))
        if method in ("two_stage", "classifier"):
            self.image_classifier = ResNetClassifier(**(image_classifier or _FAITHFUL_CLASSIFIER))

    @property
    def methods(self) -> list[str]:
        """The methods this bundle can score (two-stage bundles score all three)."""
        if self.method == "two_stage":
            return list(METHODS)
        return [self.method]

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - guidance only
        """Not used: call the sub-networks (see :mod:`inference.tasks.physis_fracture`)."""
        raise TypeError("PhysisTwoStage has no single forward; use .detector, .crop_classifier, .image_classifier")
