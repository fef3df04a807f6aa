"""Anatomy of the synthetic HR-pQCT phantoms (:mod:`training.synth.hrpqct_motion`): density in mg HA/cm3.

Every part varies per subject, none with the motion grade (the anatomy has its own random streams):

* **soft tissue** (:func:`soft_tissue`): muscle with fascicle texture (smooth noise, 1-2 mm grain, SD
  :data:`TEXTURE_SD_RANGE`), a network of fat septa between compartments (zero crossings of a coarser noise
  field, fat in partial volume), fibrous strands in the subcutaneous fat, and 3-8 vessels running along the
  limb; the pattern changes slowly from the proximal to the distal end. Intramuscular fat lowers the muscle
  density with age.
* **bone shape** (:func:`draw_shape`): several independent modes - limb size, subcutaneous fat thickness,
  bone size and aspect ratio, contour harmonics (cross-section shape), cortex thickness (a per-subject factor
  and its variation around the circumference), and where the ulna / fibula sits (angle, gap, size).
* **bone tissue**: cortical density, trabecular BV/TV, spacing, in-plane anisotropy and axial elongation, the
  trabecular tissue density, and a heterogeneous marrow (red / yellow mix: a per-subject level plus a smooth
  field).
* **positioning** (:class:`Pose`): rotation of the limb in the cast holder and an off-centre shift, kept
  inside the reconstructed field of view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

from training.synth.common import standard_normal32

#: per-scan SD (mg HA/cm3) of the muscle fascicle texture, uniform in this range (before septa and vessels)
TEXTURE_SD_RANGE = (10.0, 40.0)
TEXTURE_GRAIN_MM = (1.0, 2.0)  # Gaussian sigma of the fascicle texture
SEPTA_CELL_MM = (2.5, 5.0)  # size of the compartments the septa surround
D_FAT, D_MUSCLE, D_VESSEL = -90.0, 35.0, 45.0
MAX_TILT_RAD = np.deg2rad(15.0)  # rotation in the cast holder
MAX_OFFSET_MM = 3.0


def along_limb(ends: np.ndarray, n_slices: int) -> np.ndarray:
    """Blend two end maps ``(2, n, n)`` linearly over ``n_slices`` slices: ``(n_slices, n, n)`` float32."""
    w = np.linspace(0.0, 1.0, n_slices, dtype=np.float32)[:, None, None]
    return ends[0][None] * (1 - w) + ends[1][None] * w


@dataclass(frozen=True)
class SoftTissue:
    """Per-subject soft-tissue maps at the two ends of the stack (each ``(2, n, n)``, float32)."""

    muscle: np.ndarray  # mg HA/cm3 added inside the muscle (fascicles and fat septa)
    fat: np.ndarray  # mg HA/cm3 added inside the subcutaneous fat (fibrous strands)
    vessels: np.ndarray  # vessel fraction 0..1 (replaces the tissue by blood)
    sd: float  # drawn SD of the fascicle texture


def _smooth_unit(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    f = gaussian_filter(standard_normal32(rng, (n, n)), sigma_px)
    return f / (f.std() + 1e-9)


def _vessels(rng: np.random.Generator, n: int, px: float, half_mm: float) -> np.ndarray:
    """Two end maps of 3-8 round vessels (radius 0.5-1.8 mm) that drift a little along the limb."""
    c = (np.arange(n) - n // 2) * px
    x, y = np.meshgrid(c, c)
    out = np.zeros((2, n, n), np.float32)
    for _ in range(int(rng.integers(3, 9))):
        r = rng.uniform(0.5, 1.8)
        ang, dist = rng.uniform(0, 2 * np.pi), half_mm * np.sqrt(rng.uniform(0.05, 0.9))
        p0 = np.array([np.cos(ang), np.sin(ang)]) * dist
        drift = rng.normal(0, 0.5, 2)
        for e, p in enumerate((p0, p0 + drift)):
            d = np.hypot(x - p[0], y - p[1])
            out[e] = np.maximum(out[e], np.clip((r - d) / px + 0.5, 0, 1))
    return out


def soft_tissue(rng: np.random.Generator, n: int, px: float, half_mm: float, sd: float,
                septa: bool = True) -> SoftTissue:
    """Draw the soft-tissue maps of one subject; ``sd`` is the fascicle texture SD (0 switches all of it off)."""
    if sd <= 0:
        z = np.zeros((2, n, n), np.float32)
        return SoftTissue(muscle=z, fat=z, vessels=z, sd=0.0)
    grain = rng.uniform(*TEXTURE_GRAIN_MM) / px
    cell = rng.uniform(*SEPTA_CELL_MM) / px
    # fat partial volume of a 0.1-0.4 mm septum; drawn either way, so that septa=False keeps the rest
    septa_depth = rng.uniform(40.0, 110.0) * septa
    strands = rng.uniform(20.0, 60.0) * septa
    muscle, fat = [], []
    for _ in range(2):
        tex = _smooth_unit(rng, n, grain) * np.float32(sd)
        g = _smooth_unit(rng, n, cell)
        width = np.float32(rng.uniform(0.10, 0.22))  # |g| below this is septum
        net = np.clip(1.0 - np.abs(g) / width, 0.0, 1.0)
        muscle.append(tex - np.float32(septa_depth) * net)
        fat.append(np.float32(strands) * net)
    return SoftTissue(muscle=np.stack(muscle).astype(np.float32), fat=np.stack(fat).astype(np.float32),
                      vessels=_vessels(rng, n, px, half_mm), sd=float(sd))


@dataclass(frozen=True)
class Pose:
    """The limb's rotation in the cast holder (radians) and its centre's offset (mm) from the scanner axis."""

    tilt: float
    offset: tuple[float, float]

    def to_anatomy(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates (mm) -> anatomical ones (the limb's own frame)."""
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        dx, dy = x - self.offset[0], y - self.offset[1]
        return (c * dx + s * dy).astype(np.float32), (-s * dx + c * dy).astype(np.float32)

    def to_image(self, ax: float, ay: float) -> tuple[float, float]:
        """Anatomical coordinates (mm) -> image ones."""
        c, s = np.cos(self.tilt), np.sin(self.tilt)
        return c * ax - s * ay + self.offset[0], s * ax + c * ay + self.offset[1]


def draw_pose(rng: np.random.Generator, room_mm: float) -> Pose:
    """Rotation up to 15 degrees and an offset up to 3 mm, within ``room_mm`` of free field of view."""
    off = rng.uniform(-1, 1, 2) * min(MAX_OFFSET_MM, max(room_mm, 0.0)) / np.sqrt(2)
    return Pose(tilt=float(rng.uniform(-MAX_TILT_RAD, MAX_TILT_RAD)), offset=(float(off[0]), float(off[1])))


def contour_fn(rng: np.random.Generator, a: float, b: float, wobble: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random closed contour ``r(theta)``: an ellipse with low-order harmonic wobble."""
    harmonics = [(h, rng.normal(0, wobble / h), rng.uniform(0, 2 * np.pi)) for h in (2, 3, 4, 5)]

    def radius(theta: np.ndarray) -> np.ndarray:
        r = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
        for h, amp, phase in harmonics:
            r = r * (1 + amp * np.cos(h * theta + phase))
        return r

    return radius


def max_radius(fn: Callable[[np.ndarray], np.ndarray]) -> float:
    """Largest radius of a contour."""
    return float(fn(np.linspace(0, 2 * np.pi, 720, endpoint=False)).max())


@dataclass(frozen=True)
class Bone:
    """One bone of the slice: outer contour, centre (anatomical mm), cortex and tissue densities."""

    outer: Callable[[np.ndarray], np.ndarray]
    cx: float
    cy: float
    cort: float  # mean cortical thickness (mm)
    cort_swing: float  # relative variation of the thickness around the circumference
    cort_phase: float
    trabecular: bool


@dataclass(frozen=True)
class Shape:
    """The shape modes of one subject (see the module docstring)."""

    envelope: Callable[[np.ndarray], np.ndarray]
    fat_mm: float
    bones: tuple[Bone, Bone]
    taper: float  # per mm along z: the bones widen distally


def _main_bone(rng: np.random.Generator, site: str, size: float) -> tuple[float, float, float, float, float]:
    """(a, b, cx, cy, cortex) of the radius or tibia."""
    if site == "radius":
        a, aspect = rng.uniform(9.5, 12.5), rng.uniform(0.65, 0.85)
        return a * size, a * aspect * size, rng.uniform(-10, -6.5) * size, rng.uniform(-2.5, 2.5), rng.uniform(0.6, 1.2)
    a, aspect = rng.uniform(14.5, 18), rng.uniform(0.78, 0.95)
    return a * size, a * aspect * size, rng.uniform(-13, -9) * size, rng.uniform(-3, 1), rng.uniform(1.0, 1.8)


def draw_shape(rng: np.random.Generator, site: str, sex: str, loss: float) -> Shape:
    """Draw the shape modes of one subject; ``loss`` (0..1) thins the cortex with age."""
    size = rng.uniform(0.9, 1.08) * (1.05 if sex == "M" else 1.0)
    if site == "radius":
        env = contour_fn(rng, rng.uniform(26, 29) * size, rng.uniform(17.5, 21) * size, rng.uniform(0.02, 0.06))
        o_a, o_aspect, o_cort, o_ang = rng.uniform(3.8, 5.2), rng.uniform(0.75, 1.0), rng.uniform(0.6, 1.0), 0.0
    else:
        env = contour_fn(rng, rng.uniform(35, 39) * size, rng.uniform(29, 33) * size, rng.uniform(0.02, 0.06))
        o_a, o_aspect, o_cort, o_ang = rng.uniform(4.8, 6.8), rng.uniform(0.75, 0.95), rng.uniform(0.8, 1.3), 0.35
    a, b, cx, cy, cort = _main_bone(rng, site, size)
    cort_factor = float(np.exp(rng.normal(0, 0.2)))
    main_fn = contour_fn(rng, a, b, rng.uniform(0.03, 0.08))
    other_fn = contour_fn(rng, o_a * size, o_a * o_aspect * size, rng.uniform(0.03, 0.07))
    taper = float(rng.uniform(0.01, 0.03))
    # the ulna/fibula sits beside the main bone with a soft-tissue gap (the bones never overlap, allowing for
    # the taper's widening at the ends)
    ang = o_ang + rng.uniform(-0.3, 0.3)
    dist = (max_radius(main_fn) + max_radius(other_fn)) * 1.12 + rng.uniform(1.5, 4.0)
    bones = (
        Bone(main_fn, cx, cy, cort * cort_factor * (1 - 0.3 * loss), rng.uniform(0.15, 0.5),
             rng.uniform(0, 2 * np.pi), True),
        Bone(other_fn, cx + dist * np.cos(ang), cy + dist * np.sin(ang), o_cort * cort_factor * (1 - 0.3 * loss),
             rng.uniform(0.1, 0.4), rng.uniform(0, 2 * np.pi), False),
    )
    return Shape(envelope=env, fat_mm=float(rng.uniform(1.5, 8.0) * (0.7 if sex == "M" else 1.0)), bones=bones,
                 taper=taper)


@dataclass(frozen=True)
class Tissue:
    """Bone and marrow densities and the trabecular pattern of one subject."""

    bvtv: float
    cort_density: float
    trab_density: float  # tissue density of the trabeculae
    marrow: float  # mean marrow density (yellow ~ -60, red ~ +20)
    marrow_sd: float  # SD of the smooth marrow field
    spacing_mm: float
    z_stretch: float  # < 1: plates elongated along z
    aniso: float  # in-plane frequency scale along the anisotropy axis
    aniso_angle: float
    muscle: float  # muscle density (intramuscular fat lowers it)


def draw_tissue(rng: np.random.Generator, loss: float, age: float) -> Tissue:
    """Draw the tissue densities and trabecular pattern of one subject."""
    young = float(np.clip((60 - age) / 40, 0, 1))  # more red marrow and less muscle fat when young
    return Tissue(
        bvtv=float(np.clip(rng.normal(0.30 - 0.12 * loss, 0.05), 0.08, 0.45)),
        cort_density=float(np.clip(rng.normal(1050 - 120 * loss, 55), 750, 1250)),
        trab_density=float(rng.uniform(650, 850)),
        marrow=float(rng.uniform(-70, -30) + 40 * young * rng.random()),
        marrow_sd=float(rng.uniform(5, 25)),
        spacing_mm=float(rng.uniform(0.8, 1.6)),
        z_stretch=float(rng.uniform(0.4, 0.85)),
        aniso=float(rng.uniform(0.75, 1.25)),
        aniso_angle=float(rng.uniform(0, np.pi)),
        muscle=float(D_MUSCLE - rng.uniform(0, 15) - 15 * (1 - young) * rng.random()),
    )


def trabecular_fraction(rng: np.random.Generator, shape: tuple[int, int, int], px: float, dz: float,
                        t: Tissue) -> np.ndarray:
    """Trabecular tissue fraction per voxel from band-pass noise kept near its zero crossings."""
    noise = standard_normal32(rng, shape)
    spec = sfft.rfftn(noise, workers=1)
    fz = sfft.fftfreq(shape[0], dz)[:, None, None]
    fy = sfft.fftfreq(shape[1], px)[None, :, None]
    fx = sfft.rfftfreq(shape[2], px)[None, None, :]
    c, s = np.cos(t.aniso_angle), np.sin(t.aniso_angle)
    fu, fv = c * fx + s * fy, -s * fx + c * fy
    f = np.sqrt((t.aniso * fu) ** 2 + (fv / t.aniso) ** 2 + (t.z_stretch * fz) ** 2)
    f0 = 1.0 / t.spacing_mm
    spec *= np.exp(-0.5 * ((f - f0) / (0.45 * f0)) ** 2).astype(np.float32)
    g = sfft.irfftn(spec, s=shape, workers=1)
    g /= g.std() + 1e-9
    thr = float(np.quantile(np.abs(g[:: max(1, shape[0] // 8)]), t.bvtv))
    return np.clip(1.5 - np.abs(g) / thr, 0.0, 1.0).astype(np.float32)


def soft_inside(rho: np.ndarray, radius: np.ndarray, px: float) -> np.ndarray:
    """Fraction of a pixel inside a contour (linear partial-volume ramp one pixel wide)."""
    return np.clip((radius - rho) / px + 0.5, 0.0, 1.0).astype(np.float32)


def box(cx: float, cy: float, r_mm: float, px: float, n: int) -> tuple[slice, slice]:
    """Rows and columns of the ``n x n`` grid (pixel ``i`` at ``(i - n // 2) * px``) within ``r_mm`` of a centre."""
    def span(c: float) -> slice:
        return slice(max(int(np.floor((c - r_mm) / px)) + n // 2 - 1, 0),
                     min(int(np.ceil((c + r_mm) / px)) + n // 2 + 2, n))
    return span(cy), span(cx)


def _soft_tissue_volume(shape: Shape, tissue: Tissue, soft: SoftTissue, ax: np.ndarray, ay: np.ndarray,
                        px: float, n_slices: int, d_air: float) -> np.ndarray:
    """Air, subcutaneous fat and muscle with their texture, septa and vessels: ``(n_slices, n, n)``."""
    theta, rho = np.arctan2(ay, ax), np.hypot(ax, ay)
    env = shape.envelope(theta)
    inside = soft_inside(rho, env, px)
    muscle = soft_inside(rho, env - shape.fat_mm, px)
    base = d_air + inside * (D_FAT - d_air) + muscle * (tissue.muscle - D_FAT)
    vol = along_limb(soft.muscle * muscle + soft.fat * (inside - muscle), n_slices)
    vol += base[None]
    if soft.vessels.any():
        ves = along_limb(soft.vessels * inside, n_slices)  # vessels run in the muscle and the subcutaneous fat
        ves *= D_VESSEL - vol
        vol += ves
    return vol


def _add_bone(vol: np.ndarray, rng: np.random.Generator, b: Bone, pose: Pose, ax: np.ndarray, ay: np.ndarray,
              scale: np.ndarray, px: float, dz: float, tissue: Tissue) -> None:
    """Replace the soft tissue by one bone (cortex, trabeculae in heterogeneous marrow), in place."""
    n = vol.shape[1]
    # everything below is evaluated only in the bone's bounding box (+2 pixels of partial volume)
    reach = max_radius(b.outer) * float(scale.max()) + 2 * px
    rows, cols = box(*pose.to_image(b.cx, b.cy), reach, px, n)
    bx, by = ax[rows, cols] - b.cx, ay[rows, cols] - b.cy
    bt = np.arctan2(by, bx)
    br = np.hypot(bx, by)[None]
    outer = b.outer(bt)[None] * scale
    thick = b.cort * (1 + b.cort_swing * np.cos(bt - b.cort_phase))[None]
    f_out = soft_inside(br, outer, px)
    f_in = soft_inside(br, outer - thick, px)
    frac = trabecular_fraction(rng, f_in.shape, px, dz, tissue)
    marrow = tissue.marrow + tissue.marrow_sd * _smooth_unit(rng, max(bx.shape), 3.0 / px)[: bx.shape[0], : bx.shape[1]]
    peak = tissue.trab_density if b.trabecular else 0.4 * tissue.trab_density
    inner = marrow[None] + frac * (peak - marrow[None])
    sub = vol[:, rows, cols]
    sub += f_out * (tissue.cort_density - sub) + f_in * (inner - tissue.cort_density)
    vol[:, rows, cols] = sub


def bone_loss(age: float, sex: str) -> float:
    """Age-related bone loss 0..~1.3 (more in women): thins the cortex, lowers BV/TV and cortical density."""
    return float(np.clip((age - 45) / 45, 0, 1) * (1.3 if sex == "F" else 0.8))


def phantom(rng: np.random.Generator, n: int, n_slices: int, px: float, dz: float, age: float, sex: str,
            soft: SoftTissue, pose: Pose, shape: Shape, d_air: float) -> tuple[np.ndarray, float]:
    """Density volume (mg HA/cm3) of shape (n_slices, n, n) and the main bone's mean radius (mm)."""
    tissue = draw_tissue(rng, bone_loss(age, sex), age)
    c = ((np.arange(n) - n // 2) * px).astype(np.float32)
    ax, ay = pose.to_anatomy(*np.meshgrid(c, c))
    vol = _soft_tissue_volume(shape, tissue, soft, ax, ay, px, n_slices, d_air)
    z = (np.arange(n_slices) - n_slices / 2) * dz
    scale = (1 + shape.taper * z)[:, None, None].astype(np.float32)
    for b in shape.bones:
        _add_bone(vol, rng, b, pose, ax, ay, scale, px, dz, tissue)
    main = shape.bones[0].outer(np.linspace(0, 2 * np.pi, 360, endpoint=False))
    return vol, float(main.mean())
