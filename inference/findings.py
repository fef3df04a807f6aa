"""Task-agnostic results: what a task produces and what the result writers consume.

Tasks know nothing about DICOM output, and writers know nothing about models.
Everything here is plain data. Coordinates are in the *source image's* pixel
grid: ``x`` is the column, ``y`` the row, both 0-based with (0, 0) at the centre
of the top-left pixel. The writers convert to DICOM SCOORD (1-based, pixel
corner origin) themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Code:
    """A coded concept (value, coding scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


# Frequently used codes. Task modules add their own next to their logic.
SCT = "SCT"
DCM = "DCM"
FRACTURE = Code("72704001", SCT, "Fracture")
PRESENT = Code("52101004", SCT, "Present")
ABSENT = Code("2667000", SCT, "Absent")
# Units (UCUM). Tasks report probabilities in [0, 1] and volumes in mm3; the SR writer states them the way
# people write them (PERCENT, MILLILITER), since viewers such as OHIF print the UCUM code itself.
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
PERCENT = Code("%", "UCUM", "percent")
CUBIC_MM = Code("mm3", "UCUM", "cubic millimeter")
MILLILITER = Code("mL", "UCUM", "milliliter")
MILLIMETER = Code("mm", "UCUM", "millimeter")
HU_UNIT = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = Code("1", "UCUM", "no units")


@dataclass(frozen=True)
class ImageRef:
    """A reference to one source image (or one frame of a multi-frame image)."""

    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, only for multi-frame sources


@dataclass
class Measurement:
    """A numeric measurement such as a probability, a volume or a mean HU."""

    name: Code
    value: float
    unit: Code
    finding_site: Code | None = None
    derivation: Code | None = None


@dataclass
class Classification:
    """A qualitative evaluation (finding + value) with its probability.

    ``images`` empty means the classification is about the whole study (or
    series); otherwise it is about these source images. ``threshold`` is the
    operating point the value was decided at (``probability >= threshold`` is
    positive), when the decision is a threshold on ``probability``.
    """

    finding: Code
    value: Code
    probability: float | None = None
    finding_site: Code | None = None
    laterality: Code | None = None
    images: tuple[ImageRef, ...] = ()
    measurements: list[Measurement] = field(default_factory=list)
    tracking_id: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.probability is not None and not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")


@dataclass
class Box:
    """An axis-aligned box on one source image, in pixel coordinates (x = column, y = row)."""

    image: ImageRef
    x0: float
    y0: float
    x1: float
    y1: float
    label: Code
    score: float
    finding_site: Code | None = None
    tracking_id: str | None = None
    measurements: list[Measurement] = field(default_factory=list)
    qualitative: list[tuple[Code, Code]] = field(default_factory=list)
    text: str = ""  # the label drawn beside the box on overlays; default "<label meaning> <score>"

    def __post_init__(self) -> None:
        if not (self.x1 > self.x0 and self.y1 > self.y0):
            raise ValueError(f"box must have positive size, got ({self.x0},{self.y0})-({self.x1},{self.y1})")


@dataclass
class Mask:
    """A binary segmentation of one structure in the source series' pixel grid.

    ``array`` has shape (n_images, rows, columns); plane ``i`` belongs to
    ``images[i]``. Writers rely on this to build per-frame references.
    """

    label: Code
    category: Code
    array: np.ndarray
    images: tuple[ImageRef, ...]
    finding_site: Code | None = None
    measurements: list[Measurement] = field(default_factory=list)
    tracking_id: str | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"mask array must be 3-D (n_images, rows, cols), got shape {self.array.shape}")
        if self.array.shape[0] != len(self.images):
            raise ValueError(f"mask has {self.array.shape[0]} planes but {len(self.images)} image references")
        self.array = self.array.astype(bool, copy=False)


@dataclass
class Panel:
    """One tile of a secondary-capture overlay.

    Either ``image`` references a source image, whose pixels the writer loads
    through the display pipeline, or ``pixels`` gives a pre-computed greyscale
    picture in [0, 1] (such as a sagittal reformat). Heat map and contours use
    the panel's pixel grid.
    """

    image: ImageRef | None = None
    pixels: np.ndarray | None = None
    caption: str = ""
    boxes: list[Box] = field(default_factory=list)
    heatmap: np.ndarray | None = None
    contours: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.image is None) == (self.pixels is None):
            raise ValueError("a panel needs exactly one of image or pixels")


@dataclass
class Overlay:
    """One secondary-capture image: a single panel or a montage of several."""

    panels: list[Panel]
    title: str
    derived_from: tuple[ImageRef, ...] = ()

    def __post_init__(self) -> None:
        if not self.panels:
            raise ValueError("an overlay needs at least one panel")


@dataclass
class Findings:
    """Everything one task run says about one study.

    ``summary`` is the canonical statement of the findings, built with
    :func:`statement` and :func:`decision_text`: the SC overlay header, the SR
    and the demo table all show it word for word.
    """

    task: str
    algorithm_name: str
    algorithm_version: str
    study_instance_uid: str
    source_images: tuple[ImageRef, ...]
    classifications: list[Classification] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    overlays: list[Overlay] = field(default_factory=list)
    summary: str = ""
    synthetic_model: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.source_images:
            raise ValueError("findings must reference at least one source image")


# --------------------------------------------------------------------------- wording
# One wording for every place a finding is shown (SC overlay, SR conclusion, demo table):
# the task builds ``Findings.summary`` and its overlay captions with these helpers.


def _pair(p: float, threshold: float) -> tuple[str, str]:
    """``p`` and ``threshold`` printed with enough digits that the comparison reads right."""
    for digits in (2, 3, 4):
        a, b = f"{p:.{digits}f}", f"{threshold:.{digits}f}"
        if p >= threshold or a != b:  # "0.81 >= 0.81" reads right, "0.81 < 0.81" does not
            return a, b
    return f"{p:.6f}", f"{threshold:.6f}"


def decision_text(probability: float, threshold: float, positive: str, negative: str, *, name: str = "p") -> str:
    """A thresholded decision with its operating point.

    ``decision_text(0.73, 0.81, "fracture suspected", "no fracture detected")``
    gives ``"p=0.73 < 0.81: no fracture detected"``; at or above the threshold,
    ``"p=0.92 >= 0.81: fracture suspected"``. The comparison is made on the
    unrounded values; enough digits are printed that it never reads wrong.
    """
    a, b = _pair(float(probability), float(threshold))
    if float(probability) >= float(threshold):
        return f"{name}={a} >= {b}: {positive}"
    return f"{name}={a} < {b}: {negative}"


def counted(n: int, noun: str) -> str:
    """``counted(1, "image")`` -> ``"1 image"``, ``counted(2, "image")`` -> ``"2 images"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def statement(*parts: str) -> str:
    """Join the parts of one finding statement with ``"; "`` (empty parts dropped).

    Tasks build ``Findings.summary`` with this, so the SR conclusion, the
    overlay header and the demo table all show the same sentence.
    """
    return "; ".join(p.strip() for p in parts if p and p.strip())
