"""Task settings, defined once: one frozen, typed model per task, read by serving and training alike.

A bundle records its task's settings in ``bundle.json`` under ``task_config``.
:func:`validate_settings` checks them against the task's model when the bundle
loads (:func:`inference.bundle.read_meta`), so a bad or misspelt setting fails
there with a one-line error naming the bundle, the key and the fix, not in the
middle of a study. Serving reads them typed through :func:`settings_of`; the
training adapters (``training/tasks/*``) use the same classes as their config.

The models import nothing from :mod:`inference.tasks` at module level (the task
modules import this one); where a setting's check or helper needs a task
module, it imports it when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.errors import BundleError
from inference.mr import DEFAULT_CROP_MM, MODEL_SIZE, N4_SHRINK
from inference.radiograph import MEAN, MODEL_HEIGHT, MODEL_WIDTH, STD

if TYPE_CHECKING:
    from inference.hrpqct import DensityNorm
    from inference.tasks.physis_fracture_post import PostConfig
    from inference.tasks.spine_bmd import SpineParams

__all__ = [
    "SETTINGS", "HrpqctMotionSettings", "KneeBoneSegSettings", "PhysisFractureSettings", "SpineBmdSettings",
    "TaskSettings", "WristFractureSettings", "register_settings", "settings_of", "validate_settings",
]

S = TypeVar("S", bound="TaskSettings")

#: thesis label distribution (grades 1-5) per site (hrpqct_motion)
THESIS_TIBIA = (334, 97, 42, 24, 2)
THESIS_RADIUS = (139, 169, 233, 62, 8)


class TaskSettings(BaseModel):
    """Base of every task's settings: frozen, typed, unknown keys refused.

    ``after_training`` names the fields read only once training is over (operating points chosen on the
    validation split): the trainer leaves them out of its resume fingerprint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    after_training: ClassVar[frozenset[str]] = frozenset()


class WristFractureSettings(TaskSettings):
    """Settings of ``wrist_fracture`` (defaults are the thesis's configuration)."""

    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    stages: int = Field(4, ge=3, le=4, description="4 = full ResNet; 3 drops layer4 (light variant)")
    in_channels: Literal[1, 3] = 1
    pretrained_path: str | None = Field(None, description="local ImageNet torchvision weights (never downloaded)")
    input_hw: tuple[int, int] = Field((MODEL_HEIGHT, MODEL_WIDTH), description="network input (rows, cols)")
    mean: float = Field(MEAN, description="normalisation mean of the prepared image")
    std: float = Field(STD, gt=0, description="normalisation std of the prepared image")
    split_parts: bool = Field(True, description="score every anatomic part of an image on its own")
    min_part_share: float = Field(0.02, gt=0, lt=1, description="smallest part kept, as a share of the image")
    align: bool = Field(True, description="rotate each part upright before scoring")
    crop_area: tuple[float, float] = Field((0.9, 1.0), description="training: random crop area range")
    hflip_p: float = Field(0.5, ge=0, le=1, description="training: horizontal flip probability")
    image_labels: Literal["study", "boxes"] = Field("study", description="training: where image labels come from")
    threshold: float = Field(0.5, gt=0, lt=1, description="probability threshold for image and ALO study calls")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for the AUC confidence intervals")


class PhysisFractureSettings(TaskSettings):
    """Settings of ``physis_fracture`` (defaults: the faithful two-stage configuration)."""

    method: Literal["two_stage", "classifier", "detector"] = "two_stage"
    variant: Literal["faithful", "light"] = Field(
        "faithful", description="faithful: ResNet50 everywhere; light: ResNet18-3-stage detector and classifiers "
                                "(demo bundles under the 25 MB fp16 cap)")
    detector_kind: Literal["faster_rcnn", "retinanet"] = "faster_rcnn"
    det_long_side: int = Field(1024, ge=64, description="detector input square side (>= 1024 faithful)")
    image_size: int = Field(512, ge=32, description="whole-image classifier input square side")
    crop_size: int = Field(224, ge=32, description="crop classifier input square side")
    crops_per_image: int = Field(4, ge=1, le=16)
    crop_jitter: float = Field(0.15, ge=0, le=0.5, description="random shift/scale of positive crops (box fraction)")
    patch_crop_extent: float = Field(160.0, gt=0, description="box-patch pretraining: source pixels one crop "
                                     "classifier patch covers (a typical fracture box with its margin)")
    det_loss_weight: float = Field(1.0, ge=0)
    crop_loss_weight: float = Field(1.0, ge=0)
    image_loss_weight: float = Field(1.0, ge=0)
    hflip_p: float = Field(0.5, ge=0, le=1)
    mine_crops: bool = Field(True, description="also train the crop classifier on the detector's own fracture "
                                               "proposals (hard negatives, labelled by IoU with the truth)")
    mined_per_image: int = Field(2, ge=1, le=16)
    mine_iou: float = Field(0.3, gt=0, lt=1, description="IoU with a true fracture box for a positive proposal")
    post: dict[str, Any] = Field(default_factory=dict, description="PostConfig overrides (thresholds, top_k, ...)")
    n_boot: int = Field(1000, ge=0, description="bootstrap resamples for AUC confidence intervals")
    tune_threshold: bool = Field(True, description="after training, choose the image threshold of the highest "
                                                   "validation accuracy (the thesis's metric) for the served method")
    operating_threshold: float | None = Field(None, ge=0, le=1, description="image threshold chosen after "
                                              "training; replaces post.threshold when set")

    after_training: ClassVar[frozenset[str]] = frozenset({"tune_threshold", "operating_threshold"})

    @field_validator("post")
    @classmethod
    def _post(cls, v: dict[str, Any]) -> dict[str, Any]:
        from inference.tasks.physis_fracture_post import PostConfig

        PostConfig.from_dict(v)  # ValueError on an unknown key or a bad value
        return v

    def post_config(self) -> PostConfig:
        """The validated post-processing rules (with the tuned ``operating_threshold``, if any)."""
        from inference.tasks.physis_fracture_post import PostConfig

        post = PostConfig.from_dict(self.post)
        if self.operating_threshold is not None:
            post = PostConfig.from_dict({**post.to_dict(), "threshold": self.operating_threshold})
        return post


class SpineBmdSettings(TaskSettings):
    """Settings of ``spine_bmd`` (network, pre-processing, sampling, post-processing)."""

    backbone: Literal["resnet50", "resnet50_se", "resnet50_sk", "resnet50_ds"] = "resnet50_ds"
    variant: Literal["faithful", "light"] = "faithful"
    image_size: int = Field(512, ge=64, le=1024, description="slices resized to this (CT is 512x512)")
    in_channels: Literal[1, 3] = 3
    pretrained_path: str | None = Field(None, description="local ImageNet ResNet weights (never downloaded)")
    box_score_thresh: float = Field(0.05, ge=0, lt=1, description="detector output threshold (torchvision default)")
    negatives_per_study: int = Field(2, ge=0, description="slices without a body (discs) per training study")
    hflip: bool = True
    intensity_jitter: float = Field(
        0.0, ge=0, le=0.5,
        description="training brightness/contrast change on the [0, 1] window scale (1 = 2000 HU). Off by default: "
                    "the class is the trabecular HU itself, and 0.05 already shifts it by up to 100 HU, twice the "
                    "width of the osteopenia band")
    min_slices: int = Field(20, ge=1, description="fewest axial slices of a usable CT series")
    batch_size: int = Field(4, ge=1, description="serving: slices per forward pass")
    slices_per_vertebra: int = Field(3, ge=1, le=9, description="mid-body slices per vertebra at inference")
    central_fraction: float = Field(0.4, gt=0, le=1)
    cortex_hu: float = 300.0
    roi_fraction: float = Field(0.5, gt=0, le=1)
    class_log_offsets: tuple[float, float, float] | None = Field(
        None, description="operating point: added to the log class probabilities of a vertebra before the argmax "
                          "(normal, osteopenia, osteoporosis); None is the plain argmax")
    pseudo_boxes: bool = Field(
        False, description="weak labels: a study row with per-level classes ('vertebrae', e.g. from DXA) but no "
                           "boxes gets vertebral-body pseudo-boxes from the level finder (training.tasks.spine_weak)")
    tune_class_offsets: bool = Field(
        False, description="after training, choose class_log_offsets on the validation split for the highest "
                           "vertebra macro-F1 (choose_class_offsets)")

    after_training: ClassVar[frozenset[str]] = frozenset({"class_log_offsets", "tune_class_offsets", "batch_size"})

    @field_validator("class_log_offsets")
    @classmethod
    def _finite(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and not all(abs(x) < float("inf") for x in v):
            raise ValueError("class_log_offsets must be three finite numbers")
        return v

    def params(self) -> SpineParams:
        """The pre- and post-processing parameters these settings give (bone window: the default one)."""
        from inference.tasks.spine_bmd import SpineParams

        return SpineParams(image_size=self.image_size, in_channels=self.in_channels, min_slices=self.min_slices,
                           slices_per_vertebra=self.slices_per_vertebra, central_fraction=self.central_fraction,
                           cortex_hu=self.cortex_hu, roi_fraction=self.roi_fraction, batch_size=self.batch_size,
                           class_log_offsets=self.class_log_offsets)


class HrpqctMotionSettings(TaskSettings):
    """Settings of ``hrpqct_motion`` (faithful defaults)."""

    channels: tuple[int, ...] = (32, 64, 128, 256, 256)
    hidden: int = Field(128, ge=1)
    negative_slope: float = Field(0.01, ge=0)
    batch_norm: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    density_low: float = -500.0
    density_high: float = 2500.0
    density_mean: float = 0.0  # about the mean and std of clipped mg HA/cm3 over whole HR-pQCT slices
    density_std: float = Field(300.0, gt=0)  # (air/soft tissue around a bone cross-section)
    loss: Literal["ordinal", "cross_entropy"] = "ordinal"
    ordinal_weight: float = Field(0.5, ge=0)
    class_counts: tuple[int, ...] | None = tuple(t + r for t, r in zip(THESIS_TIBIA, THESIS_RADIUS, strict=True))
    class_weight_scheme: Literal["effective", "inverse", "none"] = "effective"
    class_weight_beta: float = Field(0.99, gt=0, lt=1)
    aggregation: Literal["argmax", "expected"] = Field(
        "argmax", description="scan grade: argmax of the mean probabilities, or the (cut) expected grade")
    grade_cutpoints: tuple[float, ...] | None = Field(
        None, description="with aggregation 'expected': 4 cut points of the expected grade (None: round it)")
    tune_grade_cutpoints: bool = Field(
        False, description="after training, choose grade_cutpoints on the validation split for the highest "
        "quadratic-weighted kappa (needs aggregation 'expected')")
    rescan_min_grade: int = Field(4, ge=2, le=5, description="grade from which a rescan is recommended")
    rescan_threshold: float | None = Field(
        None, gt=0, lt=1, description="also recommend a rescan when P(grade >= rescan_min_grade) reaches this")
    rescan_target_sensitivity: float | None = Field(
        None, gt=0, le=1, description="after training, set rescan_threshold on the validation split so that the "
        "rescan decision reaches this sensitivity (None: keep rescan_threshold)")
    augment: bool = True

    after_training: ClassVar[frozenset[str]] = frozenset({"rescan_threshold", "rescan_target_sensitivity",
                                                          "grade_cutpoints", "tune_grade_cutpoints"})

    @field_validator("grade_cutpoints")
    @classmethod
    def _cutpoints(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        from inference.tasks.hrpqct_motion import check_cutpoints

        return None if v is None else check_cutpoints(v)

    @model_validator(mode="after")
    def _cutpoints_need_expected(self) -> HrpqctMotionSettings:
        if (self.grade_cutpoints is not None or self.tune_grade_cutpoints) and self.aggregation != "expected":
            raise ValueError("grade_cutpoints and tune_grade_cutpoints need aggregation 'expected'")
        return self

    @field_validator("class_counts")
    @classmethod
    def _five(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        n = len(THESIS_TIBIA)
        if v is not None and (len(v) != n or any(c < 0 for c in v)):
            raise ValueError(f"class_counts needs {n} non-negative counts")
        return v

    def norm(self) -> DensityNorm:
        """The density normalisation these settings describe."""
        from inference.hrpqct import DensityNorm

        return DensityNorm(self.density_low, self.density_high, self.density_mean, self.density_std)


class KneeBoneSegSettings(TaskSettings):
    """Settings of ``knee_bone_seg``; defaults are the faithful configuration.

    Serving (:mod:`inference.tasks.knee_bone_seg`) passes these settings themselves to its series
    choice, pre-processing (:func:`~inference.tasks.knee_bone_seg.prepare_knee`) and post-processing,
    and training (``training.tasks.knee_bone_seg``) to the same functions: there is no second copy.
    """

    crop_mm: float = Field(DEFAULT_CROP_MM, gt=0, description="side of the square window at the joint (mm)")
    size: int = Field(MODEL_SIZE, ge=16, description="in-plane network input size")
    n4: bool = Field(True, description="N4 bias-field correction before the crop")
    n4_shrink: int = Field(N4_SHRINK, ge=1)
    norm_mean: float = Field(0.592, description="population mean of the prepared crops (synthetic; refit with `norm`)")
    norm_std: float = Field(0.382, gt=0, description="population std of the prepared crops (refit with `norm`)")
    base_channels: int = Field(32, ge=1)
    depth: int = Field(4, ge=1)
    dropout: float = Field(0.5, ge=0, lt=1)
    threshold: float = Field(0.5, gt=0, lt=1, description="probability threshold of a bone voxel")
    largest_component: bool = True
    fill_holes: bool = True
    min_slices: int = Field(20, ge=1, description="fewest planes of a usable series")
    planes: tuple[Literal["coronal", "sagittal", "axial"], ...] = Field(
        ("coronal", "sagittal"), min_length=1, description="slice orientations a usable series may have")
    batch_size: int = Field(8, ge=1, description="serving: slices per forward pass")
    augment: bool = True
    dice_over: Literal["batch", "slice"] = Field(
        "batch", description="soft Dice per bone over the whole batch (Keras-style flattened F1) or per slice")
    hd95: bool = True

    after_training: ClassVar[frozenset[str]] = frozenset({"batch_size"})


#: task name -> its settings model (plugins add theirs with :func:`register_settings`)
SETTINGS: dict[str, type[TaskSettings]] = {
    "wrist_fracture": WristFractureSettings,
    "physis_fracture": PhysisFractureSettings,
    "spine_bmd": SpineBmdSettings,
    "hrpqct_motion": HrpqctMotionSettings,
    "knee_bone_seg": KneeBoneSegSettings,
}


def register_settings(task: str, model: type[TaskSettings]) -> None:
    """Declare ``model`` as the settings of ``task`` (a plugin task's bundles are then validated at load)."""
    SETTINGS[task] = model


def _one_line(exc: ValidationError, model: type[TaskSettings], where: str) -> str:
    """The first error of ``exc`` as ``<where>: task_config.<key>: <what>; fix: <how>`` (+ how many more)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    key = ".".join(str(p) for p in err["loc"]) or "(whole)"
    top = str(err["loc"][0]) if err["loc"] else ""
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(model.model_fields))
        msg = f"unknown setting; fix: correct the spelling or remove it (known: {known})"
    elif top in model.model_fields:
        default = model.model_fields[top].get_default(call_default_factory=True)
        msg = (f"{err['msg']} (got {err.get('input')!r}); fix: give a valid value, or remove the key to use the "
               f"default {default!r}")
    else:
        msg = f"{err['msg']}; fix: make the settings consistent"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: task_config.{key}: {msg}{more}".replace("\n", " ")


def validate_settings(task: str, values: dict[str, Any], *, where: str) -> TaskSettings | None:
    """``values`` checked against ``task``'s settings model (None for a task without one).

    Raises
    ------
    BundleError
        One line naming ``where`` (the bundle), the key and the fix, if a setting is unknown or invalid.
    """
    model = SETTINGS.get(task)
    if model is None:
        return None
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BundleError(_one_line(exc, model, where)) from None


def settings_of(meta: Any, model: type[S]) -> S:
    """The typed settings of a bundle's metadata (``task_config``) as ``model``.

    Raises
    ------
    BundleError
        If they do not validate (a bundle read through :func:`inference.bundle.read_meta` already did).
    """
    where = f"bundle {getattr(meta, 'task', '?')} {getattr(meta, 'version', '?')}"
    try:
        return model.model_validate(getattr(meta, "task_config", None) or {})
    except ValidationError as exc:
        raise BundleError(_one_line(exc, model, where)) from None
