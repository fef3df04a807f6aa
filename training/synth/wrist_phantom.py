"""Forearm, wrist and hand phantoms for the radiograph generators, and the geometry fracture models need.

:func:`wrist_anatomy` builds a right wrist in PA orientation from :class:`~training.synth.radiograph.Part`
objects (adults, or children with open physes and age-dependent carpal ossification);
:func:`split_parts` and :func:`plane_points` let a generator cut bones along a fracture plane and place its
labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.radiograph import MU_CORTEX, MU_SOFT, MU_TRAB, Part, bone, inside, rot

__all__ = ["Wrist", "plane_points", "split_parts", "wrist_anatomy"]

_Y = np.array([0.0, 1.0, 0.0])

#: carpal bones: name, (x, y, z), semi-axes, in-plane angle (deg), ossification onset (years)
_CARPALS = (
    ("scaphoid", (9, -10, 1), (5, 9, 5), 30, 5.5), ("lunate", (-1, -10, 0), (6, 6, 6), 0, 4.0),
    ("triquetrum", (-10, -13, -1), (5, 5, 5), 0, 3.0), ("pisiform", (-12, -12, 7), (4, 4, 4), 0, 10.0),
    ("trapezium", (15, -25, 2), (6, 6, 6), 20, 5.0), ("trapezoid", (7, -27, 1), (4.5, 5.5, 5), 0, 5.5),
    ("capitate", (-1, -27, 0), (6, 9, 7), 0, 0.2), ("hamate", (-10, -26, 0), (6, 8, 6), 10, 0.3),
)
#: metacarpals: base (x, y), length, angle (deg, from the -y axis)
_METACARPALS = (((17, -31), 45, 35), ((7, -37), 66, 8), ((-1, -37), 63, 0), ((-8, -35), 57, -7),
                ((-14, -33), 53, -14))


def _cyl(center: np.ndarray, axis_deg: float, radius: tuple[float, float], half_len: float, cortex: float,
         mu_inner: float, tag: str, start: float | None = None, end: float | None = None,
         mu_cortex: float = MU_CORTEX) -> list[Part]:
    """A long-bone shaft along an in-plane direction (``axis_deg`` from +y), clipped to [start, end] along it."""
    ax = rot("z", axis_deg)
    u = ax @ _Y
    clips: list[tuple[np.ndarray, float]] = []
    c = np.asarray(center, float)
    if start is not None:
        clips.append((-u, -(float(u @ c) + start)))
    if end is not None:
        clips.append((u, float(u @ c) + end))
    return bone(c, ax, (radius[0], half_len, radius[1]), cortex=cortex, mu_inner=mu_inner, infinite=1,
                clips=tuple(clips), tag=tag, mu_cortex=mu_cortex)


@dataclass
class Wrist:
    """A forearm/wrist/hand phantom: parts by group plus the geometry fracture models need."""

    radius: list[Part]
    epiphyses: list[Part]
    other: list[Part]
    soft: list[Part]
    scale: float
    radius_x: float
    articular_y: float
    physis_y: float | None
    physis_width: float

    def parts(self) -> list[Part]:
        """Every part of the scene."""
        return [*self.soft, *self.other, *self.radius, *self.epiphyses]


def wrist_anatomy(rng: np.random.Generator, age_years: float) -> Wrist:
    """A right wrist in PA orientation with per-subject variation; children get physes and fewer carpals.

    Mirror x (``rot("y", 180)``) for a left wrist.
    """
    child = age_years < 18.0
    s = float(np.clip(0.55 + 0.45 * (age_years - 2.0) / 15.0, 0.55, 1.0)) if child else 1.0
    s *= float(rng.normal(1.0, 0.06))
    cort = (1.0 if child else float(rng.uniform(1.4, 2.4))) * s
    mu_trab = MU_TRAB * float(rng.uniform(0.75, 1.15)) * (0.9 if child else 1.0)
    mu_ct = MU_CORTEX * float(rng.uniform(0.85, 1.1)) * (0.85 if child else 1.0)
    j = lambda sd=1.0: float(rng.normal(0.0, sd))  # noqa: E731 - small jitter helper
    xr, xu = (11 + j()) * s, (-13 + j()) * s
    art_y = -4 * s
    incl = np.deg2rad(rng.uniform(16, 28))
    tilt = np.deg2rad(rng.uniform(3, 18))
    n_art = np.array([-np.sin(incl), -1.0, -np.sin(tilt)])
    n_art /= np.linalg.norm(n_art)
    h_art = float(n_art @ np.array([xr, art_y, 0.0]))

    radius = _cyl(np.array([xr, 60 * s, 0]), j(2), (7.5 * s, 6 * s), 90 * s, cort, MU_SOFT, "radius", start=-38 * s,
                  mu_cortex=mu_ct)
    physis_y: float | None = None
    epi: list[Part] = []
    w_phys = 0.0
    meta_clips: tuple[tuple[np.ndarray, float], ...] = ((_Y, 22 * s + 0.5),)
    if child:
        physis_y = art_y + 5.5 * s
        w_phys = float(np.clip(2.6 - 0.13 * age_years + rng.normal(0, 0.2), 0.35, 2.6))
        meta_clips += ((-_Y, -(physis_y + w_phys / 2)),)
        size = float(np.clip(0.35 + 0.06 * age_years, 0.35, 1.0))
        eb = 3.0 * s * (0.6 + 0.4 * size)
        epi = bone(np.array([xr, physis_y - w_phys / 2, 0]), np.eye(3), (10.5 * s * size, eb, 8 * s * size),
                   cortex=0.5 * s, mu_inner=mu_trab, clips=((_Y, physis_y - w_phys / 2), (n_art, h_art)),
                   tag="radius_epiphysis", mu_cortex=mu_ct)
    else:
        meta_clips += ((n_art, h_art),)
    radius += bone(np.array([xr + 1.0 * s, 9 * s, 0]), np.eye(3), (11 * s, 20 * s, 9 * s), cortex=cort * 0.55,
                   mu_inner=mu_trab, clips=meta_clips, tag="radius", mu_cortex=mu_ct)

    other: list[Part] = []
    other += _cyl(np.array([xu, 60 * s, 0]), j(2), (6 * s, 6 * s), 90 * s, cort, MU_SOFT, "ulna", start=-46 * s)
    uy = 8 * s if not child else 8 * s + 2.0
    other += bone(np.array([xu, uy, 0]), np.eye(3), (8 * s, 10 * s, 7.5 * s), cortex=cort * 0.5, mu_inner=mu_trab,
                  clips=((_Y, 14 * s + 0.5), (-_Y, -(uy - 7 * s))), tag="ulna", mu_cortex=mu_ct)
    if not child or age_years >= 6:
        other += bone(np.array([xu - 3 * s, -1.5 * s, 0]), np.eye(3), (2 * s, 5 * s, 2 * s), cortex=0.6 * s,
                      mu_inner=mu_trab, tag="ulna_styloid", mu_cortex=mu_ct)
    for name, (cx, cy, cz), semi, ang, onset in _CARPALS:
        if child and age_years < onset:
            continue
        f = float(np.clip((age_years - onset) / 6.0 + 0.3, 0.3, 1.0)) if child else 1.0
        ctr = np.array([cx + j(0.7), cy + j(0.7), cz]) * s
        other += bone(ctr, rot("z", ang + j(5)), tuple(v * s * f * rng.uniform(0.9, 1.1) for v in semi),
                      cortex=0.7 * s, mu_inner=mu_trab, tag=name, mu_cortex=mu_ct)
    for (bx, by), length, ang in _METACARPALS:
        ang_r = ang + j(2)
        base = np.array([bx, by, 0.0]) * s
        u = rot("z", ang_r) @ _Y
        length = length * s * float(rng.uniform(0.93, 1.07))
        mid = base - u * length / 2
        other += _cyl(mid, ang_r, (4.2 * s, 4.0 * s), length / 2, cort * 0.7, MU_SOFT, "metacarpal",
                      start=-length / 2 + 5 * s, end=length / 2)
        other += bone(base - u * 2.5 * s, rot("z", ang_r), (5.5 * s, 3.5 * s, 5 * s), cortex=0.6 * s,
                      mu_inner=mu_trab, tag="metacarpal_base", mu_cortex=mu_ct)
        head = base - u * (length + 1.5 * s)
        other += bone(head, rot("z", ang_r), (5.5 * s, 5.5 * s, 5.5 * s), cortex=0.6 * s, mu_inner=mu_trab,
                      tag="metacarpal_head", mu_cortex=mu_ct)
        ph = head - u * (9.5 * s + 12 * s)
        other += _cyl(ph, ang_r, (4.5 * s, 3.8 * s), 12 * s, cort * 0.6, mu_trab, "phalanx", start=-12 * s,
                      end=12 * s)
    fat = float(rng.uniform(0.9, 1.25))
    soft = [
        Part(np.array([-1 * s, 60 * s, 0]), np.eye(3), (30 * s * fat, 100, 21 * s * fat), MU_SOFT, 1,
             ((-_Y, 12 * s),), "forearm"),
        Part(np.array([0, -45 * s, 0]), rot("z", j(3)), (40 * s * fat, 56 * s, 23 * s * fat), MU_SOFT, -1,
             ((_Y, -12 * s),), "hand"),
    ]
    return Wrist(radius=radius, epiphyses=epi, other=other, soft=soft, scale=s, radius_x=xr, articular_y=art_y,
                 physis_y=physis_y, physis_width=w_phys)


def split_parts(parts: list[Part], n: np.ndarray, h: float, gap: float, delta: np.ndarray) -> list[Part]:
    """Cut ``parts`` by the plane ``n . x = h`` leaving a ``gap`` (mm); the side ``n . x < h`` moves by ``delta``."""
    n = np.asarray(n, float) / np.linalg.norm(n)
    out = []
    for p in parts:
        out.append(p.clipped(-n, -(h + gap / 2)))
        out.append(p.clipped(n, h - gap / 2).moved(delta))
    return out


def plane_points(n: np.ndarray, h: float, center: np.ndarray, within: list[Part], extent: float = 30.0,
                 step: float = 0.5) -> np.ndarray:
    """Points of the plane ``n . x = h`` near ``center`` that lie inside any of ``within`` (outer parts)."""
    n = np.asarray(n, float) / np.linalg.norm(n)
    a = np.cross(n, [0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.cross(n, [1.0, 0.0, 0.0])
    a /= np.linalg.norm(a)
    b = np.cross(n, a)
    c0 = center - (center @ n - h) * n
    g = np.arange(-extent, extent + step, step)
    uu, vv = np.meshgrid(g, g)
    pts = c0 + uu.reshape(-1, 1) * a + vv.reshape(-1, 1) * b
    ok = np.zeros(len(pts), bool)
    for p in within:
        if p.mu > 0:
            ok |= inside(p, pts)
    return pts[ok]
