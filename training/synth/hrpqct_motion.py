"""Synthetic HR-pQCT scans of the distal radius/tibia with motion artefacts from a simulated acquisition.

Physics, per scan:

1. a 3-D phantom in density units (mg HA/cm3): skin/fat envelope, muscle,
   the radius (with the ulna) or the tibia (with the fibula) as a cortical shell
   around a trabecular network (band-pass filtered 3-D noise, kept near its
   zero crossings, which gives connected plates and rods; partial volume from a
   soft threshold) in fatty marrow. Edges are anti-aliased (linear partial
   volume). Optionally (``params``; off by default, models/README.md says why) the
   muscle has a per-subject texture (fibre bundles and fat septa: 2-D noise with a 1.5 mm
   grain, SD up to 60 mg HA/cm3, varying slowly along the limb), so that a wide
   soft-tissue histogram does not by itself mean motion.
2. density -> linear attenuation ``mu = 0.25 + 0.0012 * D`` [1/cm] (air = 0).
3. parallel-beam projections over 180 degrees (both ends acquired) while the
   limb moves rigidly: a slow drift, a twitch at a random time (permanent or
   transient), a small rotation and an axial shift (views then see
   neighbouring slices). Photon noise is added to the line integrals.
4. filtered back-projection with the nominal angles (:mod:`training.synth.tomo`):
   inconsistent views give the streaks and double contours graders look for.

The grade (1-5, the manufacturer's visual scale) comes from the motion
severity with rater-like noise; the per-site distribution follows the thesis
(grade 5 rare). The manifest also holds ``motion_ssd``, the Sode et al. (2011)
estimate from the 0- and 180-degree projections, and the true severity.

Geometry: XtremeCT (110 slices, 82 um) and XtremeCT II (168 slices, 60.7 um)
along z. In-plane the image is reconstructed on a modest matrix (default 256)
covering the limb, so the recorded PixelSpacing is coarser than the scanner's
native voxel (0.25 mm radius, 0.34 mm tibia at 256); SliceThickness is native.
Modality values (RescaleSlope 1, RescaleIntercept 0) are mg HA/cm3. RescaleType
is not written: the CT Image IOD only allows "HU" there for original images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from training.synth.common import (
    DEFAULT_DIFFICULTY,
    Equipment,
    SynthError,
    UidSource,
    body_part_string,
    new_patient,
    new_series,
    new_study,
    standard_normal32,
)
from training.synth.params import Param
from training.synth.runner import StudyJob, generate_studies
from training.synth.tomo import ParallelBeam, fbp, forward_project, opposed_projection_ssd
from training.synth.volume import VolumeGeometry, write_slice_series

log = logging.getLogger(__name__)

TASK = "hrpqct_motion"
AGE_RANGE = (20.0, 90.0)
MU_WATER = 0.25  # 1/cm
MU_PER_MG = 0.0012  # 1/cm per mg HA/cm3
D_AIR = -MU_WATER / MU_PER_MG
SCANNERS: dict[str, tuple[int, float, float]] = {  # model -> (slices, slice mm, kVp)
    "XtremeCT": (110, 0.082, 59.4),
    "XtremeCT II": (168, 0.0607, 68.0),
}
FOV_MM = {"radius": 64.0, "tibia": 88.0}
TEXTURE_GRAIN_MM = 1.5  # Gaussian sigma of the muscle texture (bundles and septa)
#: default upper end of the per-scan muscle texture SD (mg HA/cm3): off, see models/README.md "A confounder tried"
TEXTURE_SD_MAX = 0.0
#: grade distributions per site, after the thesis (tibia 334/97/42/24/2, radius 139/169/233/62/8), grade 5 kept rare
GRADE_P = {"radius": (0.23, 0.28, 0.37, 0.10, 0.02), "tibia": (0.64, 0.19, 0.09, 0.06, 0.02)}
#: severity interval of each true grade (continuous scale 0..1)
SEVERITY_EDGES = (0.0, 0.08, 0.22, 0.42, 0.68, 1.0)
MAX_MOTION_MM = 1.4
#: ``params`` this generator takes (training.synth.params)
PARAMS = {
    "site": Param(str, "the scanned site (default: radius 55 %, tibia 45 %)", ("radius", "tibia")),
    "scanner": Param(str, "the scanner model and its slice geometry (default: drawn)", tuple(SCANNERS)),
    "grade": Param(int, "true motion grade of every scan (the rater's grade stays noisy)", (1, 2, 3, 4, 5)),
    "texture_sd": Param(float, "muscle texture SD in mg HA/cm3 for every scan (0: none)"),
    "texture_sd_max": Param(float, f"draw the muscle texture SD per scan from uniform(0, this); default "
                                   f"{TEXTURE_SD_MAX:g} (off)"),
    "n": Param(int, "in-plane reconstruction matrix (default 256; smaller for tests)"),
    "n_views": Param(int, "projections over 180 degrees (default 3/4 of n)"),
    "n_slices": Param(int, "slices (default the scanner's 110 or 168)"),
}


@dataclass(frozen=True)
class Motion:
    """Per-view rigid motion of one scan (views in acquisition order)."""

    shifts_px: np.ndarray  # (views, 2) in-plane (x, y) in pixels
    rotation: np.ndarray  # (views,) radians
    dz_slices: np.ndarray  # (views,) axial shift in slices

    def about_bone(self, radius_mm: float) -> Motion:
        """The same motion with the rotation rescaled from a 1 mm radius to ``radius_mm``."""
        return replace(self, rotation=self.rotation / radius_mm)

    @property
    def margin_slices(self) -> int:
        """Extra slices the phantom needs at each end so that axially shifted views stay inside it."""
        return int(np.ceil(float(np.abs(self.dz_slices).max(initial=0.0)))) + 2


def draw_grade(rng: np.random.Generator, site: str, difficulty: float) -> tuple[int, float, int]:
    """Draw (true grade, severity, rater grade); the rater sees severity with noise."""
    g = int(rng.choice(5, p=GRADE_P[site])) + 1
    sev = float(rng.uniform(SEVERITY_EDGES[g - 1], SEVERITY_EDGES[g]))
    return g, sev, rater_grade(rng, sev, difficulty)


def rater_grade(rng: np.random.Generator, severity: float, difficulty: float) -> int:
    """Grade a rater gives: severity plus Gaussian disagreement, binned; neighbours are ambiguous."""
    seen = severity + rng.normal(0.0, 0.03 + 0.06 * difficulty)
    return int(np.clip(np.searchsorted(SEVERITY_EDGES[1:-1], seen, side="right") + 1, 1, 5))


def _ramp(n: int, start: int, width: int) -> np.ndarray:
    t = (np.arange(n) - start) / max(width, 1)
    return np.clip(t, 0.0, 1.0)


def draw_motion(rng: np.random.Generator, severity: float, n_views: int, px_mm: float, slice_mm: float) -> Motion:
    """A drift plus a twitch whose amplitude scales with ``severity`` (0..1).

    The rotation is an arc of the twitch's size at a 1 mm radius; :meth:`Motion.about_bone` sets the
    bone's radius once the phantom exists (its axial extent depends on this motion).
    """
    amp = MAX_MOTION_MM * severity
    k = np.arange(n_views)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    drift = np.outer(k / (n_views - 1), direction * amp * rng.uniform(0.2, 0.6))
    start = int(rng.integers(int(0.05 * n_views), int(0.9 * n_views)))
    rise = int(rng.integers(1, max(2, n_views // 40)))
    step = _ramp(n_views, start, rise)
    if rng.random() < 0.4:  # transient twitch: the limb comes back
        back = start + int(rng.integers(n_views // 30 + 1, n_views // 6 + 2))
        step = step - _ramp(n_views, back, rise)
    tdir = rng.normal(size=2)
    tdir /= np.linalg.norm(tdir) + 1e-9
    twitch = np.outer(step, tdir * amp * rng.uniform(0.5, 1.0))
    shifts = (drift + twitch) / px_mm
    rot = step * (amp * rng.uniform(-0.5, 0.5))
    dz = (step * rng.uniform(-0.6, 0.6) + k / (n_views - 1) * rng.uniform(-0.2, 0.2)) * amp / slice_mm
    return Motion(shifts_px=shifts, rotation=rot, dz_slices=dz)


def _soft_inside(rho: np.ndarray, radius: np.ndarray, px: float) -> np.ndarray:
    """Fraction of a pixel inside a contour (linear partial-volume ramp one pixel wide)."""
    return np.clip((radius - rho) / px + 0.5, 0.0, 1.0).astype(np.float32)


def _contour_fn(rng: np.random.Generator, a: float, b: float, wobble: float) -> Callable[[np.ndarray], np.ndarray]:
    """A random closed contour ``r(theta)``: an ellipse with low-order harmonic wobble."""
    harmonics = [(h, rng.normal(0, wobble / h), rng.uniform(0, 2 * np.pi)) for h in (2, 3, 4, 5)]

    def radius(theta: np.ndarray) -> np.ndarray:
        r = a * b / np.sqrt((b * np.cos(theta)) ** 2 + (a * np.sin(theta)) ** 2)
        for h, amp, phase in harmonics:
            r = r * (1 + amp * np.cos(h * theta + phase))
        return r

    return radius


def _contour(rng: np.random.Generator, theta: np.ndarray, a: float, b: float, wobble: float) -> np.ndarray:
    return _contour_fn(rng, a, b, wobble)(theta)


def _box(cx: float, cy: float, r_mm: float, px: float, n: int) -> tuple[slice, slice]:
    """Rows and columns of the ``n x n`` grid (pixel ``i`` at ``(i - n // 2) * px``) within ``r_mm`` of a centre."""
    def span(c: float) -> slice:
        return slice(max(int(np.floor((c - r_mm) / px)) + n // 2 - 1, 0),
                     min(int(np.ceil((c + r_mm) / px)) + n // 2 + 2, n))
    return span(cy), span(cx)


def _trabecular_fraction(rng: np.random.Generator, shape: tuple[int, int, int], px: float, dz: float,
                         bvtv: float) -> np.ndarray:
    """Trabecular tissue fraction per voxel from band-pass noise kept near its zero crossings."""
    noise = standard_normal32(rng, shape)
    spec = sfft.rfftn(noise, workers=1)
    fz = sfft.fftfreq(shape[0], dz)[:, None, None]
    fy = sfft.fftfreq(shape[1], px)[None, :, None]
    fx = sfft.rfftfreq(shape[2], px)[None, None, :]
    f = np.sqrt(fx**2 + fy**2 + (0.6 * fz) ** 2)  # plates a bit elongated along z
    f0 = 1.0 / rng.uniform(0.9, 1.4)  # trabecular spacing 0.9-1.4 mm
    spec *= np.exp(-0.5 * ((f - f0) / (0.45 * f0)) ** 2).astype(np.float32)
    g = sfft.irfftn(spec, s=shape, workers=1)
    g /= g.std() + 1e-9
    thr = float(np.quantile(np.abs(g[:: max(1, shape[0] // 8)]), bvtv))
    return np.clip(1.5 - np.abs(g) / thr, 0.0, 1.0).astype(np.float32)


def muscle_texture(rng: np.random.Generator, n: int, n_slices: int, sd: float, grain_px: float) -> np.ndarray:
    """Soft-tissue texture (mg HA/cm3) of shape (n_slices, n, n): SD ``sd``, Gaussian grain ``grain_px``.

    Two smooth in-plane noise fields, blended linearly from the proximal to the distal end, so
    the pattern changes slowly along the limb as muscle bundles and septa do. The grain is millimetric
    (bundles, not voxel noise): it widens the reconstructed soft-tissue histogram as much as motion
    streaks do, but looks nothing like them.
    """
    ends = []
    for _ in range(2):
        f = gaussian_filter(standard_normal32(rng, (n, n)), grain_px)
        ends.append(f * np.float32(sd / (f.std() + 1e-9)))
    w = np.linspace(0.0, 1.0, n_slices, dtype=np.float32)[:, None, None]
    return ends[0][None] * (1 - w) + ends[1][None] * w


def phantom(rng: np.random.Generator, site: str, n: int, n_slices: int, px: float, dz: float,
            age: float, sex: str, texture: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Density volume (mg HA/cm3) of shape (n_slices, n, n) and the main bone's mean radius (mm).

    ``texture`` (same shape) is added inside the muscle (see :func:`muscle_texture`).
    """
    c = ((np.arange(n) - n // 2) * px).astype(np.float32)
    x, y = np.meshgrid(c, c)
    z = (np.arange(n_slices) - n_slices / 2) * dz
    loss = np.clip((age - 45) / 45, 0, 1) * (1.3 if sex == "F" else 0.8)
    if site == "radius":
        env_a, env_b = rng.uniform(27, 29.5), rng.uniform(18, 21)
        bone = dict(a=rng.uniform(10, 12.5), b=rng.uniform(7.5, 9), cx=rng.uniform(-10, -7), cy=rng.uniform(-2, 2),
                    cort=rng.uniform(0.6, 1.2))
        other = dict(a=rng.uniform(4, 5), b=rng.uniform(3.5, 4.5), cy=rng.uniform(0, 3), cort=rng.uniform(0.6, 1.0))
    else:
        env_a, env_b = rng.uniform(37, 40), rng.uniform(30, 34)
        bone = dict(a=rng.uniform(15, 18), b=rng.uniform(13, 15.5), cx=rng.uniform(-13, -9),
                    cy=rng.uniform(-3, 1), cort=rng.uniform(1.0, 1.8))
        other = dict(a=rng.uniform(5, 6.5), b=rng.uniform(4.5, 6), cy=rng.uniform(5, 9), cort=rng.uniform(0.8, 1.3))
    # the ulna/fibula sits beside the main bone with a soft-tissue gap (the bones never overlap)
    other["cx"] = bone["cx"] + bone["a"] * 1.25 * 1.12 + other["a"] * 1.12 + rng.uniform(1.5, 4.0)
    taper = rng.uniform(0.01, 0.03)  # per mm: the bone widens distally
    scale = (1 + taper * z)[:, None, None].astype(np.float32)
    fat_mm = rng.uniform(2.0, 7.0)
    theta = np.arctan2(y, x)
    rho = np.hypot(x, y)
    env = _contour(rng, theta, env_a, env_b, 0.04)[None]
    vol = np.full((n_slices, n, n), D_AIR, dtype=np.float32)
    vol += _soft_inside(rho[None], env, px) * (-90.0 - D_AIR)
    muscle = _soft_inside(rho[None], env - fat_mm, px)
    vol += muscle * (35.0 + 90.0)
    if texture is not None:
        vol += muscle * texture
    bvtv = float(np.clip(rng.normal(0.30 - 0.12 * loss, 0.04), 0.08, 0.42))
    cort_density = float(np.clip(rng.normal(1050 - 120 * loss, 40), 750, 1200))
    for b, trab in ((bone, True), (other, False)):
        outer_fn = _contour_fn(rng, b["a"], b["b"], 0.05)
        phase = rng.uniform(0, 2 * np.pi)
        # everything below is evaluated only in the bone's bounding box (+2 pixels of partial volume)
        reach = float(outer_fn(np.linspace(0, 2 * np.pi, 720, endpoint=False)).max() * scale.max()) + 2 * px
        rows, cols = _box(b["cx"], b["cy"], reach, px, n)
        bx, by = x[rows, cols] - b["cx"], y[rows, cols] - b["cy"]
        bt = np.arctan2(by, bx)
        br = np.hypot(bx, by)[None]
        outer = outer_fn(bt)[None] * scale
        thick = b["cort"] * (1 - 0.3 * loss) * (1 + 0.35 * np.cos(bt - phase))[None]
        f_out = _soft_inside(br, outer, px)
        f_in = _soft_inside(br, outer - thick, px)
        frac = _trabecular_fraction(rng, f_in.shape, px, dz, bvtv)
        inner = -40.0 + frac * ((750.0 if trab else 500.0) * (1.0 if trab else 0.6))
        vol[:, rows, cols] += f_out * (cort_density - 35.0) + f_in * (inner - cort_density)
        if texture is not None:  # bone replaces muscle, texture included
            vol[:, rows, cols] -= f_out * texture[:, rows, cols]
    return vol, float((bone["a"] + bone["b"]) / 2)


def acquire(rng: np.random.Generator, density: np.ndarray, motion: Motion, geom: ParallelBeam, px_mm: float,
            margin: int, photons: float) -> tuple[np.ndarray, float]:
    """Project a moving phantom (with ``margin`` extra slices each end), add photon noise, reconstruct.

    Returns the reconstructed density (slices without the margins) and the Sode SSD motion estimate.
    """
    mu = (MU_WATER + MU_PER_MG * density) * (px_mm / 10.0)  # per pixel length
    sino = forward_project(np.clip(mu, 0, None), geom, angle_offsets=motion.rotation, shifts=motion.shifts_px)
    s_out = density.shape[0] - 2 * margin
    pos = np.arange(s_out)[:, None] + margin + motion.dz_slices[None, :]
    pos = np.clip(pos, 0, density.shape[0] - 1.001)
    i0 = np.floor(pos).astype(np.int64)
    f = (pos - i0).astype(np.float32)[:, :, None]
    views = np.arange(geom.n_views)[None, :]
    upper = sino[i0 + 1, views]
    sino = sino[i0, views]
    upper -= sino
    upper *= f
    sino += upper
    sino = gaussian_filter1d(sino, 0.6, axis=2)  # detector aperture / focal spot blur
    # photon noise: Gaussian approximation of Poisson counts (exact enough above ~1,000 quanta; the thickest
    # paths keep several thousand here); in place, the sinogram is the largest array of the simulation
    lam = np.clip(sino, 0, None, out=sino)
    np.negative(lam, out=lam)
    np.exp(lam, out=lam)
    lam *= np.float32(photons)
    noise = standard_normal32(rng, lam.shape)
    noise *= np.sqrt(lam)
    lam += noise
    np.maximum(lam, 1.0, out=lam)
    lam *= np.float32(1.0 / photons)
    sino = np.log(lam, out=lam)
    np.negative(sino, out=sino)
    ssd = opposed_projection_ssd(sino)
    rec = fbp(sino, geom) / (px_mm / 10.0)
    return ((rec - MU_WATER) / MU_PER_MG).astype(np.float32), ssd


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Simulate and write one HR-pQCT scan; return its manifest row."""
    rng_a, rng_m, rng_n, rng_l = job.rng("anatomy"), job.rng("motion"), job.rng("noise"), job.rng("labels")
    p = job.params
    uids = UidSource(f"{TASK}:{job.seed}")
    sex = "F" if rng_a.random() < 0.75 else "M"
    patient = new_patient(rng_a, AGE_RANGE, sex=sex)
    site = str(p.get("site") or rng_a.choice(["radius", "tibia"], p=[0.55, 0.45]))
    model = str(p.get("scanner") or rng_a.choice(list(SCANNERS), p=[0.6, 0.4]))
    n_slices, slice_mm, kvp = SCANNERS[model]
    n_slices = int(p.get("n_slices", n_slices))
    n = int(p.get("n", 256))
    n_views = int(p.get("n_views", (3 * n) // 4))  # the scanners also acquire fewer views than columns
    px = FOV_MM[site] / n
    if "grade" in p:
        true_grade = int(p["grade"])  # 1..5: PARAMS["grade"] allows no other
        sev = float(rng_l.uniform(SEVERITY_EDGES[true_grade - 1], SEVERITY_EDGES[true_grade]))
        grade = rater_grade(rng_l, sev, job.difficulty)
    else:
        true_grade, sev, grade = draw_grade(rng_l, site, job.difficulty)
    label = grade
    if rng_l.random() < job.label_noise:
        label = int(np.clip(grade + rng_l.choice([-1, 1]), 1, 5))
    geom = ParallelBeam(n, n_views)
    motion = draw_motion(rng_m, sev, n_views, px, slice_mm)
    margin = motion.margin_slices  # only as many extra slices as this scan's axial motion needs
    # the texture has its own random stream: with it, a seed keeps the anatomy, motion and grades it had
    rng_t = job.rng("texture")
    sd_max = float(p.get("texture_sd_max", TEXTURE_SD_MAX))
    texture_sd = float(p["texture_sd"]) if "texture_sd" in p else float(rng_t.uniform(0.0, sd_max))
    if not (texture_sd >= 0.0 and sd_max >= 0.0):
        raise SynthError(f"the muscle texture SD must be >= 0 mg HA/cm3, got {texture_sd} (max {sd_max})")
    texture = (muscle_texture(rng_t, n, n_slices + 2 * margin, texture_sd, TEXTURE_GRAIN_MM / px)
               if texture_sd > 0 else None)
    dens, bone_r = phantom(rng_a, site, n, n_slices + 2 * margin, px, slice_mm, patient.age_years, sex, texture)
    del texture
    motion = motion.about_bone(bone_r)
    photons = float(rng_n.uniform(1.5e5, 4e5))
    rec, ssd = acquire(rng_n, dens, motion, geom, px, margin, photons)

    study = new_study(rng_a, uids, patient, "HR-pQCT " + ("DISTAL RADIUS" if site == "radius" else "DISTAL TIBIA"))
    canonical = site.upper() if rng_a.random() < 0.8 else str(
        rng_a.choice(["WRIST", "FOREARM"] if site == "radius" else ["ANKLE", "LEG"]))
    side = str(rng_a.choice(["L", "R"], p=[0.7, 0.3]))
    series = new_series(uids, 1, "CT", body_part_string(rng_a, canonical), laterality=side,
                        description=f"{'Radius' if site == 'radius' else 'Tibia'} {model} std",
                        protocol=f"HR-pQCT {site}")
    eq = Equipment(manufacturer="Scanco Medical AG", model=model, station="XCT01",
                   software="6.0" if model == "XtremeCT" else "6.6")
    z0 = float(rng_a.uniform(-20, 20))
    vgeom = VolumeGeometry("axial", (px, px), slice_mm, slice_mm, (-(n // 2) * px, -(n // 2) * px, z0))
    extra = {"KVP": f"{kvp:g}", "XRayTubeCurrent": 1, "ExposureTime": 100,
             "ConvolutionKernel": "FBP shepp-logan", "DataCollectionDiameter": f"{FOV_MM[site]:g}",
             "ReconstructionDiameter": f"{px * n:.4g}", "ScanOptions": "HELICAL NO"}
    sops = write_slice_series(job.out, rec, vgeom, modality="CT", patient=patient, study=study, series=series,
                              equipment=eq, uids=uids, slope=1.0, intercept=0.0,
                              window=(400.0, 1600.0), window_explanation="BONE", extra=extra)
    return [{"study_uid": study.study_uid, "patient_id": patient.patient_id, "label": label, "task": TASK,
             "grade_rater": grade, "grade_true": true_grade, "motion_severity": round(sev, 4),
             "motion_ssd": ssd, "site": site, "scanner": model, "n_slices": len(sops), "texture_sd": round(texture_sd, 1),
             "series_uid": series.series_uid}]


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic HR-pQCT scans under ``out``; return the manifest path.

    ``params``: the names of :data:`PARAMS` (site, scanner, true grade, muscle texture, and the smaller
    simulations of tests).
    """
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` scans with their grades."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
