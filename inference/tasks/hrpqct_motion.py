"""Task ``hrpqct_motion``: motion-artefact grade 1-5 of an HR-pQCT scan, with a rescan recommendation.

Pipeline (after Walle et al., Bone 2023; ``tasks/hrpqct_motion.md``): every CT
series of the study with at least 8 slices is one scan. Its 8 equally spaced
slices (:func:`inference.hrpqct.prepare_stack`) are resized to 256 x 256,
density-normalised with the bundle's constants and graded one by one by the
5-block CNN (``motion_cnn``, 5-class softmax).

Scan grade (:func:`aggregate_scan`): the 8 slice probability vectors are
averaged; the grade is the **argmax of the mean probabilities** by default (the
bundle's ``task_config.aggregation`` may select ``"expected"``: the expected
grade E = sum_k k p_k, graded by cut points, by default 1.5/2.5/3.5/4.5, i.e.
rounded to the nearest grade; ``task_config.grade_cutpoints`` holds cut points
chosen on the validation split to maximise the quadratic-weighted kappa,
:func:`training.tasks.hrpqct_motion.choose_grade_cutpoints`). The expected grade
is always reported as a measurement too. ``P(grade >= 4)`` is the sum of the mean
probabilities of grades 4 and 5; a rescan is recommended when the scan grade is
at least 4 (``task_config.rescan_min_grade``) or, when the bundle sets an
operating point ``task_config.rescan_threshold`` (chosen on the validation split
for a target sensitivity, :meth:`training.tasks.hrpqct_motion.HrpqctMotionAdapter.tune`),
when ``P(grade >= 4)`` reaches it.

Findings per scan: a "motion artifact grade" classification (coded grade,
probability of that grade, numeric grade and expected grade as measurements),
one classification per graded slice referencing that slice, a "rescan
recommended" classification (Yes/No) with ``P(grade >= 4)``, and one overlay
montage of the 8 slices captioned with their grades.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import ArrayLike
from pydicom import Dataset

from inference import codes
from inference.errors import InvalidDatasetError
from inference.findings import (
    Classification,
    Code,
    Findings,
    ImageRef,
    Measurement,
    Overlay,
    Panel,
    decision_text,
    statement,
)
from inference.hrpqct import N_SLICES, DensityNorm, prepare_stack
from inference.runtime import StageTimer, run_batched
from inference.series import Series, group_by_series
from inference.task_settings import HrpqctMotionSettings, settings_of
from inference.tasks import TaskContext, register_task
from inference.tasks.base import image_refs, model_for

log = logging.getLogger(__name__)

NAME = "hrpqct_motion"
GRADES: tuple[int, ...] = (1, 2, 3, 4, 5)
RESCAN_MIN_GRADE = 4
#: cut points of the expected grade that round it to the nearest grade (half up)
ROUNDING_CUTPOINTS: tuple[float, ...] = (1.5, 2.5, 3.5, 4.5)
Aggregation = Literal["argmax", "expected"]

__all__ = [
    "GRADES", "NAME", "RESCAN_MIN_GRADE", "ROUNDING_CUTPOINTS", "ScanGrade", "aggregate_scan", "check_cutpoints",
    "eligible_series", "finding_site", "grade_from_expected", "grade_series", "hrpqct_motion_task", "recommends_rescan", "scan_findings",
]

_RADIUS_TERMS = ("RADIUS", "FOREARM", "WRIST", "SPEICHE", "UNTERARM", "HANDGELENK", "MUNECA", "ANTEBRAZO",
                 "POIGNET", "POLSO", "RADIO")
_TIBIA_TERMS = ("TIBIA", "LEG", "ANKLE", "SCHIENBEIN", "UNTERSCHENKEL", "SPRUNGGELENK", "PIERNA", "TOBILLO")


@dataclass(frozen=True)
class ScanGrade:
    """The graded scan: slice-level and aggregated results (grades are 1-based)."""

    grade: int
    expected_grade: float
    mean_probs: np.ndarray  # (5,)
    slice_probs: np.ndarray  # (n_slices, 5)
    slice_grades: tuple[int, ...]
    p_rescan: float
    rescan: bool
    aggregation: Aggregation
    rescan_min_grade: int = RESCAN_MIN_GRADE
    rescan_threshold: float | None = None

    @property
    def grade_probability(self) -> float:
        """Mean probability of the reported grade."""
        return float(self.mean_probs[self.grade - 1])


def recommends_rescan(grade: ArrayLike, p_rescan: ArrayLike, *, rescan_min_grade: int = RESCAN_MIN_GRADE,
                      rescan_threshold: float | None = None) -> np.ndarray:
    """The rescan decision (element-wise): grade ``>= rescan_min_grade``, or ``p_rescan`` reaching the threshold."""
    decision = np.asarray(grade) >= rescan_min_grade
    return decision if rescan_threshold is None else decision | (np.asarray(p_rescan) >= rescan_threshold)


def check_cutpoints(cutpoints: Sequence[float]) -> tuple[float, ...]:
    """The cut points as a tuple, checked: 4 strictly increasing values inside (1, 5).

    Raises
    ------
    ValueError
        If they are not.
    """
    c = tuple(float(v) for v in cutpoints)
    if (len(c) != len(GRADES) - 1 or not all(np.isfinite(c)) or any(b <= a for a, b in zip(c, c[1:], strict=False))
            or c[0] <= GRADES[0] or c[-1] >= GRADES[-1]):
        raise ValueError(f"grade cut points must be {len(GRADES) - 1} strictly increasing values in "
                         f"({GRADES[0]}, {GRADES[-1]}), got {cutpoints!r}")
    return c


def grade_from_expected(expected: ArrayLike, cutpoints: Sequence[float] = ROUNDING_CUTPOINTS) -> np.ndarray:
    """Grades 1-5 (element-wise) of expected grades: 1 + the number of cut points at or below each."""
    c = np.asarray(check_cutpoints(cutpoints))
    return 1 + np.searchsorted(c, np.asarray(expected, dtype=np.float64), side="right")


def aggregate_scan(slice_probs: np.ndarray, *, aggregation: Aggregation = "argmax",
                   rescan_min_grade: int = RESCAN_MIN_GRADE, rescan_threshold: float | None = None,
                   cutpoints: Sequence[float] | None = None) -> ScanGrade:
    """Scan grade from per-slice softmax probabilities ``(n_slices, 5)``.

    Parameters
    ----------
    slice_probs:
        Rows are probability vectors over grades 1-5.
    aggregation:
        ``"argmax"``: argmax of the mean probability vector (ties go to the lower
        grade); ``"expected"``: the expected grade of the mean vector graded by
        ``cutpoints`` (:func:`grade_from_expected`).
    rescan_min_grade:
        Grades at or above this recommend a rescan; ``p_rescan`` sums the mean
        probabilities of those grades.
    rescan_threshold:
        Operating point of the rescan decision: a rescan is also recommended when
        ``p_rescan`` reaches it (the bundle's ``task_config``, chosen on the validation
        split for a target sensitivity). None: the grade rule alone.
    cutpoints:
        With ``"expected"``: 4 increasing cut points; None rounds half up
        (:data:`ROUNDING_CUTPOINTS`). Ignored by ``"argmax"``.

    Raises
    ------
    ValueError
        If the array is not ``(n >= 1, 5)``, holds negative values or rows that do not sum to 1,
        the threshold is outside (0, 1), or the cut points are invalid.
    """
    p = np.asarray(slice_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] != len(GRADES):
        raise ValueError(f"slice probabilities must have shape (n, {len(GRADES)}), got {p.shape}")
    if np.any(p < -1e-6) or not np.allclose(p.sum(1), 1.0, atol=1e-3):
        raise ValueError("each slice row must be a probability vector")
    if rescan_min_grade not in GRADES:
        raise ValueError(f"rescan_min_grade must be one of {GRADES}, got {rescan_min_grade}")
    if rescan_threshold is not None and not 0.0 < rescan_threshold < 1.0:
        raise ValueError(f"rescan_threshold must be in (0, 1), got {rescan_threshold}")
    mean = p.mean(0)
    mean = mean / mean.sum()
    grades = np.asarray(GRADES, dtype=np.float64)
    expected = float((mean * grades).sum())
    if aggregation == "argmax":
        grade = int(np.argmax(mean)) + 1
    elif aggregation == "expected":
        grade = int(grade_from_expected(expected, ROUNDING_CUTPOINTS if cutpoints is None else cutpoints))
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    p_rescan = min(max(float(mean[rescan_min_grade - 1:].sum()), 0.0), 1.0)
    rescan = bool(recommends_rescan(grade, p_rescan, rescan_min_grade=rescan_min_grade,
                                    rescan_threshold=rescan_threshold))
    return ScanGrade(
        grade=grade, expected_grade=expected, mean_probs=mean, slice_probs=p,
        slice_grades=tuple(int(i) + 1 for i in p.argmax(1)), p_rescan=p_rescan, rescan=rescan,
        aggregation=aggregation, rescan_min_grade=rescan_min_grade, rescan_threshold=rescan_threshold,
    )


def finding_site(ds: Dataset) -> Code | None:
    """Distal radius or distal tibia from BodyPartExamined (then SeriesDescription); None if unknown."""
    for keyword in ("BodyPartExamined", "SeriesDescription"):
        text = str(ds.get(keyword, "") or "").upper()
        if any(t in text for t in _RADIUS_TERMS):
            return codes.DISTAL_RADIUS
        if any(t in text for t in _TIBIA_TERMS):
            return codes.DISTAL_TIBIA
    return None


def eligible_series(datasets: Sequence[Dataset]) -> list[Series]:
    """The CT series of a study that can be graded (at least 8 slices), in order of first appearance.

    Raises
    ------
    InvalidDatasetError
        If there is none.
    """
    ct = [ds for ds in datasets if str(ds.get("Modality", "")).upper() == "CT" and "PixelData" in ds]
    series = [s for s in group_by_series(ct).values() if len(s) >= N_SLICES]
    if not series:
        raise InvalidDatasetError(f"no CT series with at least {N_SLICES} slices to grade for motion")
    return series


def _plane_ref(series: Series, index: int) -> ImageRef:
    plane = series.planes[index]
    frame = None if plane.frame is None else plane.frame + 1
    return ImageRef(str(plane.ds.SOPInstanceUID), frame)


def grade_series(series: Series, model: torch.nn.Module, device: torch.device, norm: DensityNorm, *,
                 aggregation: Aggregation = "argmax", rescan_min_grade: int = RESCAN_MIN_GRADE,
                 rescan_threshold: float | None = None, cutpoints: Sequence[float] | None = None,
                 timer: StageTimer | None = None) -> tuple[ScanGrade, list[int]]:
    """Grade one scan; returns the :class:`ScanGrade` and the indices of the 8 graded planes."""
    timer = timer or StageTimer()
    with timer.stage("preprocess"):
        stack, idx = prepare_stack(series.volume(), norm)
        x = torch.from_numpy(stack).unsqueeze(1)  # (8, 1, 256, 256)
    with timer.stage("forward"):
        logits = run_batched(model, x, N_SLICES, device)
    with timer.stage("postprocess"):
        probs = torch.softmax(torch.as_tensor(logits).float(), dim=1).numpy()
        scan = aggregate_scan(probs, aggregation=aggregation, rescan_min_grade=rescan_min_grade,
                              rescan_threshold=rescan_threshold, cutpoints=cutpoints)
    return scan, idx


def scan_findings(scan: ScanGrade, refs: Sequence[ImageRef], site: Code | None, label: str = "scan"
                  ) -> tuple[list[Classification], Overlay]:
    """Classifications and the montage of one graded scan; ``refs`` are the 8 graded slices."""
    if len(refs) != len(scan.slice_grades):
        raise ValueError(f"{len(refs)} slice references for {len(scan.slice_grades)} graded slices")
    out = [Classification(
        finding=codes.MOTION_ARTIFACT_GRADE, value=codes.MOTION_GRADES[scan.grade],
        probability=scan.grade_probability, finding_site=site, images=tuple(refs),
        measurements=[
            Measurement(codes.MOTION_ARTIFACT_SCORE, float(scan.grade), codes.GRADE_UNIT, finding_site=site),
            Measurement(codes.EXPECTED_MOTION_ARTIFACT_GRADE, round(scan.expected_grade, 4), codes.GRADE_UNIT,
                        finding_site=site),
        ],
        tracking_id=f"{label} motion grade",
    )]
    for i, (ref, g) in enumerate(zip(refs, scan.slice_grades, strict=True), start=1):
        out.append(Classification(
            finding=codes.MOTION_ARTIFACT_GRADE, value=codes.MOTION_GRADES[g],
            probability=float(scan.slice_probs[i - 1, g - 1]), finding_site=site, images=(ref,),
            measurements=[Measurement(codes.MOTION_ARTIFACT_SCORE, float(g), codes.GRADE_UNIT, finding_site=site)],
            tracking_id=f"{label} slice {i} motion grade",
        ))
    out.append(Classification(
        finding=codes.RESCAN_RECOMMENDED, value=codes.YES if scan.rescan else codes.NO,
        probability=scan.p_rescan, finding_site=site, images=tuple(refs), tracking_id=f"{label} rescan",
        threshold=scan.rescan_threshold,
    ))
    panels = [Panel(image=ref, caption=f"slice {i}: grade {g} (p={scan.slice_probs[i - 1, g - 1]:.2f})")
              for i, (ref, g) in enumerate(zip(refs, scan.slice_grades, strict=True), start=1)]
    title = f"HR-pQCT motion grading ({label}, 8 slices)"
    return out, Overlay(panels=panels, title=title, derived_from=tuple(refs))


def rescan_statement(scan: ScanGrade) -> str:
    """Why a rescan is or is not recommended, with the rule's operating points.

    E.g. ``"grade 4 >= 4: rescan recommended"``, ``"P(grade>=4)=0.62 >= 0.40: rescan
    recommended"`` or ``"grade 2 < 4, P(grade>=4)=0.12 < 0.40: no rescan needed"``.
    """
    k = scan.rescan_min_grade
    by_grade = scan.grade >= k
    if by_grade:
        return f"grade {scan.grade} >= {k}: rescan recommended"
    if scan.rescan_threshold is None:
        return f"grade {scan.grade} < {k}: no rescan needed"
    text = decision_text(scan.p_rescan, scan.rescan_threshold, "rescan recommended", "no rescan needed",
                         name=f"P(grade>={k})")
    return text if scan.rescan else f"grade {scan.grade} < {k}, {text}"


def scan_statement(scan: ScanGrade) -> str:
    """The finding of one scan, e.g. ``"motion grade 2 (p=0.71); grade 2 < 4: no rescan needed"``."""
    return statement(f"motion grade {scan.grade} (p={scan.grade_probability:.2f})", rescan_statement(scan))


def _norm_of(meta: object) -> DensityNorm:
    extra = getattr(getattr(meta, "input", None), "extra", {}) or {}
    data = extra.get("normalisation")
    return DensityNorm.from_dict(data) if isinstance(data, dict) else DensityNorm()


def hrpqct_motion_task(datasets: Sequence[Dataset], context: TaskContext) -> Findings:
    """Grade every HR-pQCT scan of a study for motion artefacts.

    Raises
    ------
    InvalidDatasetError
        If the study has no CT series with at least 8 slices.
    ModelNotFoundError
        If no bundle is pinned or promoted for the task.
    BundleError
        If the bundle's grade cut points are invalid.
    """
    timer = StageTimer()
    with timer.stage("load"):
        loaded = model_for(NAME, context)
        scans = eligible_series(datasets)
    settings = settings_of(loaded.meta, HrpqctMotionSettings)
    aggregation: Aggregation = settings.aggregation
    rescan_min = settings.rescan_min_grade
    threshold = settings.rescan_threshold
    cutpoints = settings.grade_cutpoints
    norm = _norm_of(loaded.meta)
    classifications: list[Classification] = []
    overlays: list[Overlay] = []
    sources: list[ImageRef] = []
    summary: list[str] = []
    for k, series in enumerate(scans, start=1):
        scan, idx = grade_series(series, loaded.model, loaded.device, norm, aggregation=aggregation,
                                 rescan_min_grade=rescan_min, rescan_threshold=threshold, cutpoints=cutpoints,
                                 timer=timer)
        with timer.stage("postprocess"):
            site = finding_site(series.datasets[0])
            label = f"scan {k}" if len(scans) > 1 else "scan"
            refs = [_plane_ref(series, i) for i in idx]
            cls, overlay = scan_findings(scan, refs, site, label)
            classifications += cls
            overlays.append(overlay)
            sources += image_refs(series.datasets)
            summary.append(f"{label.capitalize()}: {scan_statement(scan)}")
        log.debug("hrpqct_motion %s: grade %d, expected %.2f, slice grades %s", label, scan.grade,
                  scan.expected_grade, scan.slice_grades)
    return Findings(
        task=NAME, algorithm_name=loaded.meta.algorithm_name, algorithm_version=loaded.version,
        study_instance_uid=str(datasets[0].StudyInstanceUID), source_images=tuple(dict.fromkeys(sources)),
        classifications=classifications, overlays=overlays, summary=statement(*summary),
        synthetic_model=loaded.meta.synthetic_only, timings_s=dict(timer.seconds),
    )


register_task(NAME, hrpqct_motion_task)
