"""Post-processing of ``spine_bmd``: lumbar level finding, slice selection and the class rules.

Level finding (the cheap pass that decides which slices go through the detector)
----------------------------------------------------------------------------------
1. On every slice, bone (> ``cortex_hu``) is split into connected components
   (bridging one-pixel breaks in a thin cortex); *vertebral* components are
   at least ``vertebra_width_mm`` wide (a lumbar body is 40-50 mm) or
   ``vertebra_depth_mm`` deep front to back (body, canal ring and spinous
   process). Contrast-filled vessels (an arterial-phase aorta passes 300 HU),
   calcified plaque, oral contrast in a bowel loop and noise specks in an
   enhancing kidney are bone-bright too, but smaller, and a fat plane
   separates them from the spine (:func:`inference.tasks.spine_bmd_profile.vertebra_mask`).
   The spine's midline column is the central axial column with the most
   vertebra voxels (:func:`inference.ct.spine_midline_column`).
2. On every slice the first row of the vertebra in a thin sagittal slab (10 mm)
   around that column is the body's anterior cortex; it is interpolated over
   slices without a vertebra (discs) and median-filtered along the stack
   (lordosis moves it smoothly).
3. The *bone profile* of a slice counts the cortical rows in a 12 mm band
   behind that anterior cortex. Vertebral bodies have a cortical shell
   (anterior wall, endplates) on every slice whatever their trabecular
   density; intervertebral discs have none, and the posterior elements (which
   reach the disc levels at the facet joints) lie further back. Counting cortex
   rather than averaging HU matters: an osteoporotic body (40-110 HU) and a
   disc (70-110 HU) have the same mean.
4. Slices with bone form runs; gaps thinner than ``close_mm`` (or ``weak_mm`` with faint cortex) are closed, runs
   shorter than ``min_body_mm`` are dropped unless cut by the stack's end, and
   runs longer than ``max_body_mm`` (a disc lost to thick slices) are split at
   the profile's minimum. Each run is one vertebral body.
5. Level names come from the z-order of the runs and one anchor, in this order
   of preference (:func:`label_runs`):

   * ribs: a body whose slices show bone more than ``rib_mm`` lateral to the
     midline is thoracic (bone specks under ``min_bone_mm2`` do not count);
     the first body below the last such one is L1;
   * the sacrum: the most inferior run when it is much wider than the body
     above it (ilia) is S1; the body above is L5;
   * otherwise the most superior complete body is L1 (lumbar CT framed from
     the thoracolumbar junction, as the synthetic studies are).

   A body cut by the top of the stack is never named (its level is unknown). A body that
   reaches the edge with at least 0.8 times the median height of the others is whole, not cut
   (an L1 touching the first slice is still L1).

Classification rules
--------------------
* Per slice, the detector's boxes inside the expected vertebral-body region
  are grouped: the top-scoring box is the body; every detection overlapping it
  (IoU >= 0.5; torchvision emits one box per class and proposal) gives its
  class's score. Scores per class are the maxima, normalised to sum to 1.
* Per vertebra, the class distribution is the mean over its mid-body slices;
  the class is its argmax and the probability its value.
* Patient level: the lowest of L1-L4 (the most severe class), as DXA
  reporting takes the lowest T-score; its confidence is the probability that
  at least one of the reported vertebrae is at least that severe,
  ``1 - prod_v P_v(class < worst)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.boxes import box_iou
from inference.tasks.spine_bmd_profile import IN_SLICE, SpineGeometry, spine_geometry

log = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES", "LEVEL_NAMES", "REPORTED_LEVELS", "BodyRun", "SliceDetection", "VertebraResult",
    "aggregate_vertebra", "body_runs", "find_levels", "label_runs", "lateral_extent_mm", "patient_class",
    "select_slices", "slice_class_scores",
]

CLASS_NAMES: tuple[str, ...] = ("normal", "osteopenia", "osteoporosis")
LEVEL_NAMES: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
REPORTED_LEVELS: tuple[str, ...] = ("L1", "L2", "L3", "L4")


@dataclass(frozen=True)
class BodyRun:
    """One vertebral body along the stack: slice indices (stack order, inclusive) and extent in mm."""

    i0: int
    i1: int
    z0: float
    z1: float
    partial: bool = False
    width_mm: float = 0.0
    name: str = ""

    @property
    def center_mm(self) -> float:
        """Mid-height of the body (mm)."""
        return (self.z0 + self.z1) / 2.0

    @property
    def height_mm(self) -> float:
        """Extent along the stack (mm)."""
        return self.z1 - self.z0

    def named(self, name: str, width_mm: float | None = None) -> BodyRun:
        """A copy with a level name (and optionally a lateral width)."""
        return BodyRun(self.i0, self.i1, self.z0, self.z1, self.partial,
                       self.width_mm if width_mm is None else width_mm, name)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Inclusive (start, end) index pairs of the True runs of a 1-D mask."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]])
    d = np.diff(m.astype(int))
    return list(zip(np.nonzero(d == 1)[0].tolist(), (np.nonzero(d == -1)[0] - 1).tolist(), strict=True))


def body_runs(
    profile: np.ndarray,
    positions: Sequence[float] | np.ndarray,
    *,
    min_rows: float = 2.0,
    close_mm: float = 3.0,
    min_body_mm: float = 12.0,
    max_body_mm: float = 45.0,
    edge_mm: float = 2.0,
    weak_mm: float = 6.0,
) -> list[BodyRun]:
    """Vertebral bodies as runs of slices whose profile shows cortical bone (step 4 above).

    Gaps of up to ``weak_mm`` whose slices still show some cortex (fewer than ``min_rows`` rows, none empty)
    between mid-body slices (not endplates) are closed too: a thin anterior cortex at high kVp fades to one
    row at mid-body, while a disc lies between two endplates.

    Returns the runs ordered from superior to inferior (descending position).
    """
    prof = np.asarray(profile, dtype=float)
    pos = np.asarray(positions, dtype=float)
    if len(prof) != len(pos):
        raise ValueError("one profile value per slice is needed")
    if len(pos) < 2:
        return []
    step = float(np.median(np.abs(np.diff(pos)))) or 1.0
    mask = prof >= min_rows
    gap = max(1, int(round(close_mm / step)))
    for s, e in _runs(~mask):  # close thin gaps (noise, partial volume) inside a body
        if s > 0 and e < len(mask) - 1 and (e - s + 1) < gap:
            mask[s:e + 1] = True
    weak_gap = int(round(weak_mm / step))  # 0: off
    plate = 0.5 * float(np.percentile(prof[prof > 0], 90)) if (prof > 0).any() else 0.0
    for s, e in _runs(~mask):  # a thin cortex (140 kVp) can fade to one row at mid-body: still the body
        if (s > 0 and e < len(mask) - 1 and (e - s + 1) <= weak_gap and (prof[s:e + 1] > 0).all()
                and max(prof[s - 1], prof[e + 1]) < plate):  # a disc lies between endplates (many rows)
            mask[s:e + 1] = True
    pieces: list[tuple[int, int]] = []
    for s, e in _runs(mask):
        stack = [(s, e)]
        while stack:
            a, b = stack.pop()
            if (b - a + 1) * step > max_body_mm and b - a >= 4:
                lo, hi = a + max(1, int(round(8.0 / step))), b - max(1, int(round(8.0 / step)))
                if hi > lo:
                    cut = lo + int(np.argmin(ndimage.uniform_filter1d(prof[lo:hi + 1], size=3)))
                    stack += [(a, cut - 1), (cut + 1, b)]
                    continue
            pieces.append((a, b))
    lo_pos, hi_pos = float(pos.min()), float(pos.max())
    out: list[BodyRun] = []
    for a, b in pieces:
        z0, z1 = float(min(pos[a], pos[b])) - step / 2, float(max(pos[a], pos[b])) + step / 2
        partial = (z0 - lo_pos) < edge_mm or (hi_pos - z1) < edge_mm
        if (z1 - z0) < min_body_mm and not partial:
            continue
        out.append(BodyRun(int(a), int(b), z0, z1, partial))
    return sorted(out, key=lambda r: -r.center_mm)


def lateral_extent_mm(volume_hu: np.ndarray, run: BodyRun, geom: SpineGeometry, col_spacing: float,
                      cortex_hu: float, *, row_spacing: float | None = None, min_bone_mm2: float = 5.0) -> float:
    """Largest distance (mm) from the midline of bone in the spine's AP rows over the run's central slices.

    Bone components smaller than ``min_bone_mm2`` (noise in an enhancing kidney cortex, which reaches
    230 HU in the arterial phase) are left out; a rib or an ilium is far larger.
    """
    a, b = sorted((run.i0, run.i1))
    mid = (a + b) // 2
    sl = volume_hu[max(a, mid - 1):min(b, mid + 1) + 1, geom.ap_rows[0]:geom.ap_rows[1] + 1, :]
    bone = (sl > cortex_hu).any(axis=0)
    labels, n = ndimage.label(bone, structure=IN_SLICE[1])
    if n == 0:
        return 0.0
    area = np.bincount(labels.ravel(), minlength=n + 1) * col_spacing * (row_spacing or col_spacing)
    keep = area >= min_bone_mm2
    keep[0] = False
    cols = np.nonzero(keep[labels].any(axis=0))[0]
    return float(np.abs(cols - geom.column).max() * col_spacing) if cols.size else 0.0


def _cut_short(run: BodyRun, runs: Sequence[BodyRun], ratio: float = 0.8) -> bool:
    """Is ``run`` (touching the end of the stack) cut short, not a whole body that merely reaches the edge?

    A body counts as whole when it is at least ``ratio`` times the median height of the bodies inside
    the stack (without such bodies, a run at the edge counts as cut). A whole L1 touching the top of
    the scan must stay L1: skipping it as "cut" renamed every level one too low.
    """
    if not run.partial:
        return False
    whole = [r.height_mm for r in runs if not r.partial]
    return not whole or run.height_mm < ratio * float(np.median(whole))


def label_runs(runs: Sequence[BodyRun], widths: Sequence[float] | None = None, *, rib_mm: float = 65.0,
               sacrum_width_ratio: float = 1.5) -> tuple[list[BodyRun], BodyRun | None, str]:
    """Name the runs L1..L5 (step 5 above).

    Parameters
    ----------
    runs:
        Bodies ordered superior to inferior (as :func:`body_runs` returns them).
    widths:
        Lateral bone extent per run (mm from the midline); default each run's ``width_mm``.

    Returns
    -------
    (named runs superior to inferior, sacrum run or None, anchor used: "ribs", "sacrum" or "top")
    """
    runs = list(runs)
    if not runs:
        return [], None, ""
    w = list(widths) if widths is not None else [r.width_mm for r in runs]
    runs = [r.named(r.name, wi) for r, wi in zip(runs, w, strict=True)]
    sacrum: BodyRun | None = None
    if len(runs) > 1 and w[-1] > sacrum_width_ratio * max(w[-2], 1e-6):
        sacrum = runs.pop()
    first_cut = _cut_short(runs[0], runs)
    thoracic = [i for i, wi in enumerate(w[:len(runs)]) if wi > rib_mm]
    if thoracic:
        start, anchor = thoracic[-1] + 1, "ribs"
        names = {i: LEVEL_NAMES[k] for k, i in enumerate(range(start, min(len(runs), start + 5)))}
    elif sacrum is not None:
        anchor = "sacrum"
        names = {i: LEVEL_NAMES[-1 - k] for k, i in enumerate(reversed(range(max(0, len(runs) - 5), len(runs))))}
    else:
        start = 1 if first_cut and len(runs) > 1 else 0
        anchor = "top"
        names = {i: LEVEL_NAMES[k] for k, i in enumerate(range(start, min(len(runs), start + 5)))}
    top_cut = first_cut and runs[0].i1 >= max(r.i1 for r in runs)
    named = [runs[i].named(nm) for i, nm in names.items() if not (i == 0 and top_cut)]
    return sorted(named, key=lambda r: -r.center_mm), sacrum, anchor


def find_levels(volume_hu: np.ndarray, positions: Sequence[float] | np.ndarray, pixel_spacing: tuple[float, float],
                *, cortex_hu: float = 300.0, anterior_up: bool = True) -> SpineGeometry:
    """The profile pass end to end: geometry, body runs and their level names (L1..L5)."""
    pos = np.asarray(positions, dtype=float)
    vol = np.asarray(volume_hu) if anterior_up else np.asarray(volume_hu)[:, ::-1, :]
    geom = spine_geometry(vol, pos, pixel_spacing, cortex_hu=cortex_hu)
    runs = body_runs(geom.profile, pos)
    widths = [lateral_extent_mm(vol, r, geom, float(pixel_spacing[1]), cortex_hu,
                                row_spacing=float(pixel_spacing[0])) for r in runs]
    geom.runs, geom.sacrum, geom.anchor = label_runs(runs, widths)
    if not anterior_up:  # back to the caller's row order
        rows = vol.shape[1]
        geom.ap_rows = (rows - 1 - geom.ap_rows[1], rows - 1 - geom.ap_rows[0])
        geom.anterior_row = rows - 1 - geom.anterior_row
    log.debug("spine levels: %s (anchor %s)", [(r.name, round(r.center_mm, 1)) for r in geom.runs], geom.anchor)
    return geom


def select_slices(run: BodyRun, positions: Sequence[float] | np.ndarray, *, central_fraction: float = 0.4,
                  count: int = 3) -> list[int]:
    """Up to ``count`` evenly spread slice indices within the central part of a body (mid-body slices).

    The detector runs only on these: every k-th slice of the central
    ``central_fraction`` of the body's height, k chosen to give ``count``
    slices; the nearest slice to the centre when the body is thin.
    """
    pos = np.asarray(positions, dtype=float)
    c, h = run.center_mm, run.height_mm * central_fraction / 2.0
    inside = np.nonzero(np.abs(pos - c) <= h)[0]
    if inside.size == 0:
        return [int(np.argmin(np.abs(pos - c)))]
    if inside.size <= count:
        return sorted(int(i) for i in inside)
    picks = np.linspace(0, inside.size - 1, count).round().astype(int)
    return sorted({int(inside[i]) for i in picks})


# --------------------------------------------------------------------------- detections -> classes


@dataclass(frozen=True)
class SliceDetection:
    """The vertebral body found on one slice: its box, the class distribution and the box score."""

    slice_index: int
    box: tuple[float, float, float, float]
    probs: np.ndarray
    score: float


def slice_class_scores(
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    slice_index: int = 0,
    region: tuple[float, float, float, float] | None = None,
    n_classes: int = len(CLASS_NAMES),
    iou_group: float = 0.5,
) -> SliceDetection | None:
    """The body's box and class distribution on one slice from raw detector output.

    ``labels`` are 1-based (0 is background). Only boxes whose centre lies in
    ``region`` (x0, y0, x1, y1) count, when given. None when nothing is left.
    """
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    lab = np.asarray(labels, dtype=int).ravel()
    sc = np.asarray(scores, dtype=float).ravel()
    keep = (lab >= 1) & (lab <= n_classes)
    if region is not None:
        cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        keep &= (cx >= region[0]) & (cx <= region[2]) & (cy >= region[1]) & (cy <= region[3])
    b, lab, sc = b[keep], lab[keep], sc[keep]
    if b.shape[0] == 0:
        return None
    top = int(np.argmax(sc))
    group = box_iou(b[[top]], b)[0] >= iou_group
    per_class = np.zeros(n_classes)
    for lb, s in zip(lab[group], sc[group], strict=True):
        per_class[lb - 1] = max(per_class[lb - 1], s)
    probs = per_class / per_class.sum()
    return SliceDetection(int(slice_index), tuple(float(v) for v in b[top]), probs, float(sc[top]))


@dataclass
class VertebraResult:
    """Per-vertebra outcome: level, class distribution, chosen mid-body slice and box, trabecular HU."""

    level: str
    probs: np.ndarray
    slice_index: int
    box: tuple[float, float, float, float]
    slices: list[int]
    run: BodyRun
    mean_hu: float | None = None
    log_offsets: tuple[float, ...] | None = None

    @property
    def class_index(self) -> int:
        """Index into :data:`CLASS_NAMES`: the argmax of the log-probabilities plus the bundle's class offsets."""
        return decide_class(self.probs, self.log_offsets)

    @property
    def class_name(self) -> str:
        """The class name."""
        return CLASS_NAMES[self.class_index]

    @property
    def probability(self) -> float:
        """Probability of the chosen class."""
        return float(self.probs[self.class_index])


def decide_class(probs: np.ndarray, log_offsets: Sequence[float] | None = None) -> int:
    """Class of a distribution (or of each row of a 2-D array): argmax of ``log p + offsets``.

    The offsets are an operating point chosen on the validation split (a shift of the class priors,
    ``training.tasks.spine_bmd.choose_class_offsets``); without them this is the plain argmax.
    """
    p = np.asarray(probs, dtype=float)
    score = p if log_offsets is None else np.log(np.clip(p, 1e-12, None)) + np.asarray(log_offsets, dtype=float)
    idx = np.argmax(score, axis=-1)
    return idx if p.ndim > 1 else int(idx)  # type: ignore[return-value]


def aggregate_vertebra(run: BodyRun, detections: Sequence[SliceDetection],
                       log_offsets: Sequence[float] | None = None) -> VertebraResult | None:
    """Mean class distribution over a vertebra's mid-body slices; box and slice of the best detection."""
    dets = [d for d in detections if d is not None]
    if not dets:
        return None
    probs = np.mean([d.probs for d in dets], axis=0)
    best = max(dets, key=lambda d: d.score)
    return VertebraResult(run.name, probs / probs.sum(), best.slice_index, best.box, [d.slice_index for d in dets], run,
                          log_offsets=None if log_offsets is None else tuple(float(x) for x in log_offsets))


def patient_class(vertebrae: Sequence[VertebraResult]) -> tuple[int, float]:
    """Patient-level class (the most severe of the vertebrae) and its confidence.

    The confidence is ``1 - prod_v P_v(class < worst)``: the probability that
    at least one vertebra is at least as severe as the reported class.

    Raises
    ------
    ValueError
        With no vertebra.
    """
    if not vertebrae:
        raise ValueError("patient class needs at least one vertebra")
    worst = max(v.class_index for v in vertebrae)
    below = np.prod([float(np.sum(v.probs[:worst])) for v in vertebrae])
    return worst, float(np.clip(1.0 - below, 0.0, 1.0))
