"""Abdominal organs and great vessels of the synthetic lumbar CT (``spine_bmd``), with contrast phases.

About two thirds of the studies are contrast-enhanced (arterial or portal venous phase, :data:`PHASES`),
which puts the kidneys, liver, spleen, aorta and IVC into the trabecular bone's HU range with an
enhancement that varies from study to study; some have positive oral contrast in bowel loops, and older
patients calcified aortic plaque. None of them depends on the bone-density class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.synth.spine_anatomy import ellipse as _ellipse
from training.synth.spine_anatomy import mix as _mix
from training.synth.spine_anatomy import z_overlap as _z_overlap

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


def mix_ellipse(img: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, cx: float, cy: float, a: float,
                 b: float, value: float, weight: float = 1.0) -> None:
    """Mix an ellipse into one slice, touching only its bounding box."""
    rows = _index_window(y[:, 0], cy - b, cy + b)
    cols = _index_window(x[0], cx - a, cx + a)
    _mix(img[rows, cols], weight * _ellipse(x[rows, cols], y[rows, cols], cx, cy, a, b, px), value)


def mix_ellipsoid(img: np.ndarray, x: np.ndarray, y: np.ndarray, px: float, e: Ellipsoid, z: float,
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
        mix_ellipse(img, x, y, px, cx + self.aorta_dx, ay, self.aorta_r, self.aorta_r, self.aorta_hu)
        mix_ellipse(img, x, y, px, cx + self.ivc_dx, front - self.ivc_gap - 8.0, 12.0, 8.0, self.ivc_hu)
        for ang, zc, half, r, hu in self.plaques:
            w = float(_z_overlap(np.array([z]), thick, zc - half, zc + half)[0])
            if w > 0.0:
                rim = self.aorta_r - r
                mix_ellipse(img, x, y, px, cx + self.aorta_dx + rim * np.cos(ang), ay + rim * np.sin(ang), r, r,
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
