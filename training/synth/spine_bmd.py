"""Synthetic axial lumbar/abdominal CT with per-vertebra bone-density classes.

Anatomy in patient coordinates (LPS, mm): L1-L5 vertebral bodies as elliptic
cylinders with a waist, a cortical shell and endplates around trabecular bone,
posterior elements (pedicle/lamina ring around the spinal canal, spinous and
transverse processes), intervertebral discs, the sacrum's top below L5, psoas
and back muscles, aorta, IVC, kidneys, abdominal organs and fat, air outside.
Lordosis moves the bodies along y with z.

Partial volume is exact along z for the column (each structure contributes the
overlap of its z extent with the slice thickness), sampled at three depths of the
slab for the organs, and linear over one pixel in-plane. The image is then
blurred by a Gaussian PSF and gets correlated Gaussian noise.

Confounders, as in opportunistic screening on routine abdominal CT: about two
thirds of the studies are contrast-enhanced (arterial or portal venous phase,
``PHASES``), which puts the kidneys, liver, spleen, aorta and IVC into the
trabecular bone's HU range with an enhancement that varies from study to
study; some have positive oral contrast in bowel loops, and older patients
calcified aortic plaque. None of them depends on the bone-density class, so a
whole-CT intensity histogram loses most of the class while the vertebral body
itself still shows it (``tests/unit/test_baseline.py``).

Ground truth: a DXA-like patient T-score (age and sex dependent), a
per-vertebra T-score around it, WHO classes from that (normal T >= -1,
osteopenia -2.5 < T < -1, osteoporosis T <= -2.5), and a trabecular HU of
``193 + 33 T`` plus individual scatter, so classes overlap at the edges as in
real data (normal ~160-250, osteopenia ~110-160, osteoporosis ~40-110 HU).
The manifest row holds per level the class, T-score, trabecular HU, slice range,
mid-body slices and their SOP UIDs, and boxes of the body on the mid-body slices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft as sfft
from scipy.ndimage import gaussian_filter

from training.synth.common import (
    DEFAULT_DIFFICULTY,
    Equipment,
    UidSource,
    body_part_string,
    new_patient,
    new_series,
    new_study,
    standard_normal32,
)
from training.synth.params import Param
from training.synth.runner import StudyJob, generate_studies
from training.synth.volume import VolumeGeometry, write_slice_series

log = logging.getLogger(__name__)

TASK = "spine_bmd"
AGE_RANGE = (40.0, 90.0)
LEVELS = ("L1", "L2", "L3", "L4", "L5")
CLASSES = ("normal", "osteopenia", "osteoporosis")
EQUIPMENT = (
    Equipment("SIEMENS", "SOMATOM Definition AS+", station="CT01"),
    Equipment("GE MEDICAL SYSTEMS", "Revolution CT", station="CT02"),
    Equipment("Philips", "iCT 256", station="CT03"),
    Equipment("Canon Medical Systems", "Aquilion ONE", station="CT04"),
)


#: contrast phase -> probability and per-tissue HU ranges (uniform); native = no IV contrast
PHASES: dict[str, tuple[float, dict[str, tuple[float, float]]]] = {
    "native": (0.35, {"aorta": (35.0, 50.0), "ivc": (35.0, 45.0), "cortex": (28.0, 40.0),
                      "medulla": (25.0, 35.0), "liver": (45.0, 65.0), "spleen": (40.0, 50.0)}),
    "arterial": (0.15, {"aorta": (250.0, 420.0), "ivc": (50.0, 110.0), "cortex": (140.0, 230.0),
                        "medulla": (50.0, 90.0), "liver": (60.0, 85.0), "spleen": (90.0, 150.0)}),
    "portal_venous": (0.50, {"aorta": (130.0, 210.0), "ivc": (120.0, 190.0), "cortex": (140.0, 210.0),
                             "medulla": (120.0, 190.0), "liver": (95.0, 135.0), "spleen": (105.0, 135.0)}),
}
ORAL_CONTRAST_P = 0.3
#: ``params`` this generator takes (training.synth.params)
PARAMS = {
    "n": Param(int, "in-plane matrix (default 256 or 320)"),
    "pixel_spacing": Param(float, "in-plane pixel spacing in mm (default 0.6-0.9)"),
    "thickness": Param(float, "slice thickness in mm (default 1.5, 2.0, 2.5 or 3.0)"),
    "t_shift": Param(float, "patient mean T-score (the per-vertebra scatter stays)"),
    "phase": Param(str, "contrast phase (default: drawn, a third native)", tuple(PHASES)),
}


def who_class(t_score: float) -> str:
    """WHO class of a T-score: normal T >= -1, osteopenia -2.5 < T < -1, osteoporosis T <= -2.5."""
    if t_score >= -1.0:
        return "normal"
    if t_score > -2.5:
        return "osteopenia"
    return "osteoporosis"


def trabecular_hu(t_score: float) -> float:
    """Mean trabecular HU that a T-score corresponds to (before individual scatter)."""
    return 193.0 + 33.0 * t_score


def draw_t_scores(rng: np.random.Generator, age: float, sex: str) -> np.ndarray:
    """Patient-level DXA-like T-score with per-vertebra variation (L1..L5)."""
    loss = 0.045 if sex == "F" else 0.028
    t_patient = rng.normal(0.3 - loss * max(age - 35.0, 0.0), 1.1)
    return t_patient + rng.normal(0.0, 0.3, size=len(LEVELS))


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Pixel fraction inside from a signed distance (mm, positive inside)."""
    return np.clip(d / px + 0.5, 0.0, 1.0).astype(np.float32)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, px: float) -> np.ndarray:
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _soft((1.0 - r) * min(a, b), px)


def _box(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float, px: float) -> np.ndarray:
    d = np.minimum(np.minimum(x - x0, x1 - x), np.minimum(y - y0, y1 - y))
    return _soft(d, px)


def _z_overlap(z: np.ndarray, thick: float, z0: float, z1: float) -> np.ndarray:
    """Fraction of each slice ``[z - t/2, z + t/2]`` inside ``[z0, z1]``."""
    lo = np.maximum(z - thick / 2, z0)
    hi = np.minimum(z + thick / 2, z1)
    return np.clip((hi - lo) / thick, 0.0, 1.0)


def _mix(vol: np.ndarray, frac: np.ndarray, value: float | np.ndarray) -> None:
    vol += frac * (value - vol)


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid (mm, LPS) filled with one HU value."""

    cx: float
    cy: float
    cz: float
    a: float
    b: float
    c: float
    hu: float


def _index_window(axis: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of an ascending grid axis covering ``[lo, hi]`` plus one pixel each side."""
    i0 = int(np.searchsorted(axis, lo, side="left")) - 1
    i1 = int(np.searchsorted(axis, hi, side="right")) + 1
    return slice(max(i0, 0), min(i1, len(axis)))


def _mix_ellipse(img: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, cx: float, cy: float, a: float,
                 b: float, value: float, weight: float = 1.0) -> None:
    """Mix an ellipse into one slice, touching only its bounding box."""
    rows = _index_window(y[:, 0], cy - b, cy + b)
    cols = _index_window(x[0], cx - a, cx + a)
    _mix(img[rows, cols], weight * _ellipse(x[rows, cols], y[rows, cols], cx, cy, a, b, px), value)


def _mix_ellipsoid(img: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, e: Ellipsoid, z: float,
                   thick: float, inside: np.ndarray) -> None:
    """Mix ``e`` into one slice: the slab is sampled at three depths, only the ellipse's bounding box is touched.

    ``inside`` (same shape as ``img``) limits the organ to the body's interior.
    """
    depth = (z + np.array([-thick / 3.0, 0.0, thick / 3.0]) - e.cz) / e.c
    scales = np.sqrt(np.clip(1.0 - depth ** 2, 0.0, None))
    top = float(scales.max())
    if top <= 0.0:
        return
    rows = _index_window(y[:, 0], e.cy - e.b * top, e.cy + e.b * top)
    cols = _index_window(x[0], e.cx - e.a * top, e.cx + e.a * top)
    xs, ys = x[rows, cols], y[rows, cols]
    frac = sum(_ellipse(xs, ys, e.cx, e.cy, e.a * s, e.b * s, px) for s in scales if s > 0.0) / 3.0
    _mix(img[rows, cols], frac * inside[rows, cols], e.hu)


@dataclass(frozen=True)
class Vessels:
    """Aorta and IVC, which follow the spine's anterior surface at a fat gap, and calcified aortic plaques.

    Offsets are mm: ``*_dx`` from the body's centre line, ``*_gap`` in front of its anterior surface.
    ``plaques`` are (angle on the wall, centre z, half-length, radius, HU).
    """

    aorta_dx: float
    aorta_gap: float
    aorta_r: float
    aorta_hu: float
    ivc_dx: float
    ivc_gap: float
    ivc_hu: float
    plaques: tuple[tuple[float, float, float, float, float], ...]

    def draw(self, img: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, z: float, thick: float,
             cx: float, front: float) -> None:
        """Mix both vessels and their plaques into the slice at ``z``; ``cx``/``front`` locate the body."""
        ay = front - self.aorta_gap - self.aorta_r
        _mix_ellipse(img, x, y, px, cx + self.aorta_dx, ay, self.aorta_r, self.aorta_r, self.aorta_hu)
        _mix_ellipse(img, x, y, px, cx + self.ivc_dx, front - self.ivc_gap - 8.0, 12.0, 8.0, self.ivc_hu)
        for ang, zc, half, r, hu in self.plaques:
            w = float(_z_overlap(np.array([z]), thick, zc - half, zc + half)[0])
            if w > 0.0:
                rim = self.aorta_r - r
                _mix_ellipse(img, x, y, px, cx + self.aorta_dx + rim * np.cos(ang), ay + rim * np.sin(ang), r, r,
                             hu, w)


def draw_organs(rng: np.random.Generator, levels: dict[str, dict[str, Any]], age: float,
                body: tuple[float, float, float, float], phase: str | None = None
                ) -> tuple[list[Ellipsoid], Vessels, dict[str, Any]]:
    """Kidneys, liver, spleen and bowel loops (in drawing order), the great vessels and aortic plaque.

    ``body`` is (centre y, lateral and AP semi-axes, fat thickness); ``phase`` forces a contrast phase
    (drawn from ``PHASES`` otherwise). Returns the ellipsoids, the vessels and the study's contrast
    description for the manifest (phase, oral contrast, calcified plaque count, vessel and kidney HU).
    """
    names = list(PHASES)
    drawn = str(rng.choice(names, p=[PHASES[k][0] for k in names]))
    if phase is None:
        phase = drawn
    elif phase not in PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; known: {', '.join(PHASES)}")
    hu = {k: float(rng.uniform(*v)) for k, v in PHASES[phase][1].items()}
    oral = bool(rng.random() < ORAL_CONTRAST_P)
    body_cy, body_a, body_b, fat = body
    out: list[Ellipsoid] = []
    # liver (right = -x in LPS): its inferior tip somewhere between L1's top and L3
    tip = float(rng.uniform(levels["L3"]["zc"], levels["L1"]["z1"] + 10.0))
    c = float(rng.uniform(110.0, 150.0))
    out.append(Ellipsoid(-float(rng.uniform(105.0, 120.0)), float(rng.uniform(-35.0, -5.0)), tip + c,
                         float(rng.uniform(55.0, 75.0)), float(rng.uniform(65.0, 85.0)), c, hu["liver"]))
    # spleen (left, posterior), only its lower pole reaches the lumbar levels
    c = float(rng.uniform(40.0, 55.0))
    out.append(Ellipsoid(float(rng.uniform(80.0, 100.0)), float(rng.uniform(15.0, 35.0)),
                         levels["L1"]["z1"] + float(rng.uniform(0.0, 45.0)) + c,
                         float(rng.uniform(22.0, 30.0)), float(rng.uniform(35.0, 45.0)), c, hu["spleen"]))
    # kidneys: the left sits a little higher; cortex, medulla, sinus fat on the medial side
    for side in (-1.0, 1.0):
        zc = levels["L2"]["zc"] + (12.0 if side > 0 else 0.0) + float(rng.normal(0.0, 8.0))
        cx, cy = side * float(rng.uniform(62.0, 78.0)), float(rng.uniform(18.0, 32.0))
        a, b, c = float(rng.uniform(24.0, 30.0)), float(rng.uniform(20.0, 26.0)), float(rng.uniform(48.0, 60.0))
        cortex = float(rng.uniform(5.0, 7.0))
        out.append(Ellipsoid(cx, cy, zc, a, b, c, hu["cortex"] + float(rng.normal(0.0, 6.0))))
        out.append(Ellipsoid(cx, cy, zc, a - cortex, b - cortex, c - cortex, hu["medulla"]))
        out.append(Ellipsoid(cx - side * 0.45 * a, cy - 0.2 * b, zc, 0.4 * a, 0.4 * b, 0.55 * c, -80.0))
    # bowel loops in the anterior abdomen, in front of the great vessels: gas, fluid, or positive oral contrast
    for _ in range(int(rng.integers(6, 13))):
        kind = rng.random()
        value = (float(rng.uniform(150.0, 450.0)) if oral and kind < 0.6
                 else float(rng.uniform(-950.0, -700.0)) if kind > 0.8 else float(rng.uniform(0.0, 25.0)))
        r = float(rng.uniform(8.0, 18.0))
        out.append(Ellipsoid(float(rng.uniform(-0.6, 0.6)) * (body_a - fat),
                             min(body_cy - float(rng.uniform(0.35, 0.8)) * (body_b - fat), -45.0 - r),
                             float(rng.uniform(levels["L5"]["z0"], levels["L1"]["z1"] + 10.0)),
                             r, r * float(rng.uniform(0.7, 1.0)), float(rng.uniform(15.0, 40.0)), value))
    # calcified plaque on the aortic wall, more common with age
    n_plaque = int(rng.poisson(max(age - 45.0, 0.0) / 8.0))
    plaques = tuple((float(rng.uniform(0.0, 2.0 * np.pi)), float(rng.uniform(levels["L4"]["zc"], levels["L1"]["z1"])),
                     float(rng.uniform(2.0, 8.0)), float(rng.uniform(1.0, 2.5)), float(rng.uniform(350.0, 1000.0)))
                    for _ in range(n_plaque))
    vessels = Vessels(float(rng.uniform(10.0, 18.0)), float(rng.uniform(3.0, 8.0)),
                      float(rng.uniform(9.0, 13.0)) * (1.0 + max(age - 60.0, 0.0) / 150.0), hu["aorta"],
                      -float(rng.uniform(20.0, 26.0)), float(rng.uniform(2.0, 6.0)), hu["ivc"], plaques)
    return out, vessels, {"phase": phase, "oral_contrast": oral, "aortic_plaques": n_plaque,
                 "aorta_hu": round(hu["aorta"], 1), "ivc_hu": round(hu["ivc"], 1),
                 "kidney_cortex_hu": round(hu["cortex"], 1)}


def render(rng: np.random.Generator, n: int, px: float, thick: float, t_scores: np.ndarray,
           difficulty: float, age: float = 65.0, phase: str | None = None
           ) -> tuple[np.ndarray, np.ndarray, dict[str, dict[str, Any]], tuple[float, float, float], dict[str, Any]]:
    """Render the HU volume (slices from inferior to superior).

    Returns
    -------
    hu, z, levels, origin, contrast:
        ``(S, n, n)`` float32 HU, slice centre z (mm), per-level ground truth
        (z extent, centre, semi-axes, trabecular HU), ImagePositionPatient of slice 0 and the
        study's contrast description (see :func:`draw_organs`).
    """
    # vertebral column, top of L1 at z = 0 going down
    levels: dict[str, dict[str, Any]] = {}
    z_top = 0.0
    size = rng.uniform(0.9, 1.12)
    lordosis = rng.uniform(4.0, 12.0)
    scol = rng.normal(0.0, 3.0)
    scatter = 8.0 + 14.0 * difficulty
    for i, name in enumerate(LEVELS):
        h = rng.uniform(24.0, 28.5) * size
        disc = rng.uniform(7.0, 11.0) * size
        z1 = z_top
        z0 = z1 - h
        zc = 0.5 * (z0 + z1)
        depth = (zc + 100.0) / 100.0
        levels[name] = {
            "z0": z0, "z1": z1, "zc": zc, "disc0": z0 - disc,
            "cx": scol * np.sin(zc / 60.0), "cy": -lordosis * np.sin(np.pi * (zc + 160.0) / 200.0),
            "a": (20.0 + 1.2 * i) * size * rng.uniform(0.95, 1.05), "b": (15.0 + 0.8 * i) * size,
            "cort": rng.uniform(0.8, 1.3), "cort_hu": rng.uniform(650.0, 950.0),
            "trab_hu": float(trabecular_hu(float(t_scores[i])) + rng.normal(0.0, scatter)),
            "depth": depth,
        }
        z_top = z0 - disc
    sacrum_top = z_top
    # coverage: from above L1 to somewhere in L5 or the sacrum, at most 120 slices
    z_hi = rng.uniform(3.0, 15.0)
    z_lo = max(rng.uniform(sacrum_top - 15.0, levels["L5"]["zc"]), z_hi - 119 * thick)
    n_sl = int(np.floor((z_hi - z_lo) / thick)) + 1
    z = z_hi - (n_sl - 1) * thick + np.arange(n_sl) * thick  # inferior -> superior
    # in-plane grid, FOV centred a little behind the vertebral body
    cy0 = rng.uniform(5.0, 20.0)
    cx0 = rng.normal(0.0, 4.0)
    c = (np.arange(n) - n // 2) * px
    x, y = (g.astype(np.float32) for g in np.meshgrid(c + cx0, c + cy0))  # float32: half the memory traffic
    origin = (float(c[0] + cx0), float(c[0] + cy0), float(z[0]))
    # soft tissue background, constant along z
    body_a, body_b = rng.uniform(140.0, 190.0), rng.uniform(110.0, 150.0)
    body_cy = 95.0 - body_b
    bg = np.full((n, n), -1000.0, dtype=np.float32)
    _mix(bg, _ellipse(x, y, 0.0, body_cy, body_a, body_b, px), -100.0 + rng.normal(0, 8))
    fat = rng.uniform(10.0, 35.0)
    inner_body = _ellipse(x, y, 0.0, body_cy, body_a - fat, body_b - fat, px)
    _mix(bg, inner_body, 35.0)
    _mix(bg, _ellipse(x, y, 0.0, -70.0, body_a * 0.6, 45.0, px), rng.uniform(-60.0, 20.0))  # bowel/mesentery
    for side in (-1, 1):
        _mix(bg, _ellipse(x, y, side * 32.0, 55.0, 22.0, 24.0, px), 50.0)  # erector spinae
        _mix(bg, _ellipse(x, y, side * 70.0, 20.0, 28.0, 45.0, px), 10.0)  # perirenal fat and fascia
    organs, vessels, contrast = draw_organs(rng, levels, age, (body_cy, body_a, body_b, fat), phase)
    vol = np.repeat(bg[None], n_sl, axis=0)
    by_z = sorted(levels.values(), key=lambda lv: lv["zc"])
    zcs = [lv["zc"] for lv in by_z]
    body_cx = np.interp(z, zcs, [lv["cx"] for lv in by_z])
    body_front = np.interp(z, zcs, [lv["cy"] - lv["b"] for lv in by_z])
    for k in range(n_sl):
        for organ in organs:
            _mix_ellipsoid(vol[k], x, y, px, organ, float(z[k]), thick, inner_body)
        vessels.draw(vol[k], x, y, px, float(z[k]), thick, float(body_cx[k]), float(body_front[k]))
        # psoas grows going down
        grow = np.clip((levels["L1"]["z1"] - z[k]) / 150.0, 0.15, 1.0)
        for side in (-1, 1):
            _mix(vol[k], _ellipse(x, y, side * (30.0 + 12 * grow), 2.0, 8 + 14 * grow, 8 + 10 * grow, px), 50.0)
    # trabecular texture (band-pass noise)
    tex = standard_normal32(rng, vol.shape)
    spec = sfft.rfftn(tex, workers=1)
    f = np.sqrt(sfft.fftfreq(n_sl, thick)[:, None, None] ** 2 + sfft.fftfreq(n, px)[None, :, None] ** 2
                + sfft.rfftfreq(n, px)[None, None, :] ** 2)
    spec *= np.exp(-0.5 * ((f - 0.35) / 0.15) ** 2).astype(np.float32)
    tex = sfft.irfftn(spec, s=vol.shape, workers=1)
    tex *= 28.0 / (tex.std() + 1e-9)
    for lv in levels.values():
        fz_out = _z_overlap(z, thick, lv["z0"], lv["z1"])
        fz_in = _z_overlap(z, thick, lv["z0"] + lv["cort"], lv["z1"] - lv["cort"])
        fz_disc = _z_overlap(z, thick, lv["disc0"], lv["z0"])
        fz_post = _z_overlap(z, thick, lv["z0"] + 3.0, lv["z1"] - 1.0)
        for k in np.nonzero((fz_out > 0) | (fz_disc > 0) | (fz_post > 0))[0]:
            waist = 1.0 - 0.06 * (1.0 - ((z[k] - lv["zc"]) / (0.5 * (lv["z1"] - lv["z0"]))) ** 2)
            a, b = lv["a"] * waist, lv["b"] * waist
            cx, cy = lv["cx"], lv["cy"]
            if fz_disc[k] > 0:
                _mix(vol[k], fz_disc[k] * _ellipse(x, y, cx, cy, lv["a"] * 1.02, lv["b"] * 1.02, px),
                     80.0 + rng.normal(0, 5))
            if fz_post[k] > 0:
                canal_y = cy + b + 9.0
                ring = _ellipse(x, y, cx, canal_y, 15.0, 12.0, px) - _ellipse(x, y, cx, canal_y, 10.0, 7.5, px)
                post = np.maximum(ring, _box(x, y, cx - 3.0, cx + 3.0, canal_y + 8.0, canal_y + 40.0, px))
                post = np.maximum(post, _box(x, y, cx - 45.0, cx + 45.0, canal_y - 6.0, canal_y - 1.0, px)
                                  * (abs(z[k] - lv["zc"]) < 6.0))
                _mix(vol[k], fz_post[k] * post, 420.0)
                _mix(vol[k], fz_post[k] * _ellipse(x, y, cx, canal_y, 10.0, 7.5, px), 10.0)
            if fz_out[k] > 0:
                outer = _ellipse(x, y, cx, cy, a, b, px)
                inner = _ellipse(x, y, cx, cy, a - lv["cort"], b - lv["cort"], px)
                _mix(vol[k], fz_out[k] * outer, lv["cort_hu"])
                _mix(vol[k], fz_in[k] * inner, lv["trab_hu"] + tex[k])
    # sacrum top (S1 body, wide) if covered
    fz_s = _z_overlap(z, thick, sacrum_top - 40.0, sacrum_top)
    for k in np.nonzero(fz_s > 0)[0]:
        _mix(vol[k], fz_s[k] * _ellipse(x, y, 0.0, levels["L5"]["cy"] + 8, 26.0, 17.0, px),
             trabecular_hu(float(np.mean(t_scores))) + 20.0)
        for side in (-1, 1):
            _mix(vol[k], fz_s[k] * _ellipse(x, y, side * 45.0, 25.0, 22.0, 16.0, px), 250.0)
    return vol, z, levels, origin, contrast


def make_study(job: StudyJob) -> list[dict[str, Any]]:
    """Write one axial lumbar CT series and return its manifest row."""
    rng_a, rng_n, rng_l = job.rng("anatomy"), job.rng("noise"), job.rng("labels")
    p = job.params
    uids = UidSource(f"{TASK}:{job.seed}")
    patient = new_patient(rng_a, AGE_RANGE, sex="F" if rng_a.random() < 0.6 else "M")
    n = int(p.get("n", int(rng_a.choice([256, 320], p=[0.7, 0.3]))))
    px = float(p.get("pixel_spacing", rng_a.uniform(0.6, 0.9)))
    thick = float(p.get("thickness", rng_a.choice([1.5, 2.0, 2.5, 3.0])))
    t_scores = draw_t_scores(rng_l, patient.age_years, patient.sex)
    if "t_shift" in p:
        t_scores = t_scores - t_scores.mean() + float(p["t_shift"])
    hu, z, levels, origin, contrast = render(rng_a, n, px, thick, t_scores, job.difficulty, patient.age_years,
                                             p.get("phase"))
    hu = gaussian_filter(hu, sigma=(0.0, 0.6 / px, 0.6 / px))  # in-plane PSF
    sigma = float(rng_n.uniform(10.0, 25.0))
    noise = gaussian_filter(standard_normal32(rng_n, hu.shape), sigma=(0.0, 0.8, 0.8))
    hu += noise * (sigma / (noise.std() + 1e-9))

    eq = EQUIPMENT[int(rng_a.integers(len(EQUIPMENT)))]
    canonical = str(rng_a.choice(["LSPINE", "SPINE", "ABDOMEN"], p=[0.45, 0.2, 0.35]))
    study = new_study(rng_a, uids, patient, "CT ABDOMEN" if canonical == "ABDOMEN" else "CT LWS")
    enhanced = contrast["phase"] != "native"
    region = "Abdomen" if canonical == "ABDOMEN" else "LWS"
    series = new_series(uids, int(rng_a.integers(2, 6)), "CT", body_part_string(rng_a, canonical, 0.3),
                        description=f"{region} {'KM ' if enhanced else ''}{thick:g}mm Knochen",
                        protocol=f"{region} {'KM ' + contrast['phase'] if enhanced else 'nativ'}")
    geom = VolumeGeometry("axial", (px, px), thick, thick, origin)
    extra: dict[str, Any] = {"KVP": "120", "XRayTubeCurrent": int(rng_a.integers(120, 350)), "ExposureTime": 500,
                             "ConvolutionKernel": str(rng_a.choice(["B60f", "BONE", "YB", "FC30"])),
                             "ReconstructionDiameter": f"{px * n:.4g}", "ScanOptions": "HELICAL"}
    if enhanced or contrast["oral_contrast"]:  # Contrast/Bolus module
        agents = (["Iomeprol 350"] if enhanced else []) + (["Gastrografin"] if contrast["oral_contrast"] else [])
        extra["ContrastBolusAgent"] = " + ".join(agents)
        extra["ContrastBolusRoute"] = "IV" if enhanced else "ORAL"
    sops = write_slice_series(job.out, hu, geom, modality="CT", patient=patient, study=study, series=series,
                              equipment=eq, uids=uids, slope=1.0, intercept=-1024.0, rescale_type="HU",
                              window=((500.0, 40.0), (2000.0, 400.0)),
                              window_explanation=["BONE", "ABDOMEN"], signed=False, bits_stored=12,
                              extra=extra)
    vertebrae: dict[str, str] = {}
    detail: dict[str, dict[str, Any]] = {}
    boxes: list[dict[str, Any]] = []
    worst = 0
    for i, name in enumerate(LEVELS[:4]):
        lv = levels[name]
        cls = who_class(float(t_scores[i]))
        noisy = cls
        if rng_l.random() < job.label_noise:
            noisy = CLASSES[int(np.clip(CLASSES.index(cls) + rng_l.choice([-1, 1]), 0, 2))]
        inside = np.nonzero((z >= lv["z0"]) & (z <= lv["z1"]))[0]
        if not len(inside):
            continue
        h = lv["z1"] - lv["z0"]
        mid = [int(k) for k in inside if abs(z[k] - lv["zc"]) <= 0.25 * h] or [int(inside[len(inside) // 2])]
        vertebrae[name] = noisy
        worst = max(worst, CLASSES.index(noisy))
        detail[name] = {"class": noisy, "class_true": cls, "t_score": round(float(t_scores[i]), 3),
                        "trabecular_hu": round(lv["trab_hu"], 1), "slices": [int(inside[0]), int(inside[-1])],
                        "mid_slices": mid, "mid_sops": [sops[k] for k in mid]}
        for k in mid:
            waist = 1.0 - 0.06 * (1.0 - ((z[k] - lv["zc"]) / (0.5 * h)) ** 2)
            col = (lv["cx"] - origin[0]) / px
            row = (lv["cy"] - origin[1]) / px
            ha, hb = lv["a"] * waist / px, lv["b"] * waist / px
            boxes.append({"sop_instance_uid": sops[k], "x0": round(max(col - ha, 0.0), 2),
                          "y0": round(max(row - hb, 0.0), 2), "x1": round(min(col + ha, n - 1.0), 2),
                          "y1": round(min(row + hb, n - 1.0), 2), "label": noisy, "level": name})
    return [{"study_uid": study.study_uid, "patient_id": patient.patient_id, "task": TASK,
             "label": CLASSES[worst], "vertebrae": vertebrae, "levels": detail, "boxes": boxes,
             "series_uid": series.series_uid, "n_slices": len(sops), "contrast": contrast}]


def generate(out: Path, n: int, seed: int, *, workers: int = 2, difficulty: float = DEFAULT_DIFFICULTY,
             label_noise: float = 0.02, params: dict[str, Any] | None = None) -> Path:
    """Write ``n`` synthetic lumbar CT studies under ``out``; return the manifest path.

    ``params``: the names of :data:`PARAMS`.
    """
    return generate_studies(Path(out), n, seed, make_study, workers=workers, difficulty=difficulty,
                            label_noise=label_noise, params=params, param_spec=PARAMS)


def preview(out_png: Path, n: int, seed: int) -> Path:
    """Contact sheet of ``n`` studies with their per-vertebra boxes and classes."""
    from training.synth.preview import contact_sheet

    return contact_sheet(TASK, Path(out_png), n, seed)
