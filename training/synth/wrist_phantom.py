"""Forearm, wrist and hand phantoms for the radiograph generators, and the geometry fracture models need.

:func:`wrist_anatomy` builds a right wrist in PA orientation from :class:`~training.synth.radiograph.Part`
objects (adults, or children with open physes and age-dependent carpal ossification);
:func:`split_parts` and :func:`plane_points` let a generator cut bones along a fracture plane and place its
labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.radiograph import MU_CORTEX, MU_FAT, MU_SOFT, MU_TRAB, Part, bone, inside, rot

__all__ = ["Shape", "Wrist", "draw_shape", "plane_points", "split_parts", "wrist_anatomy"]

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
    shape: Shape | None = None
    radius_halfwidth: float = 11.0

    def parts(self) -> list[Part]:
        """Every part of the scene."""
        return [*self.soft, *self.other, *self.radius, *self.epiphyses]


@dataclass(frozen=True)
class Shape:
    """Per-subject shape modes (factors on the template; mm where stated)."""

    radius_width: float
    radius_length: float
    ulna_width: float
    carpal_size: float
    ulnar_variance: float  # mm, + = ulna longer than the radius at the joint (adults -2..+2 typical)
    physis_offset: float  # mm along the bone, children only
    flexion: float  # deg, + = palmar flexion of the hand
    deviation: float  # deg, + = ulnar deviation
    degeneration: float  # 0 none .. 1 marked (joint-space narrowing, osteophytes, sclerosis)


def draw_shape(rng: np.random.Generator, age_years: float) -> Shape:
    """Draw the shape modes; degenerative change becomes likelier and stronger with age (adults only)."""
    child = age_years < 18.0
    p_deg = float(np.clip((age_years - 40.0) / 50.0, 0.0, 0.7)) if not child else 0.0
    deg = float(rng.uniform(0.3, 1.0)) if rng.random() < p_deg else 0.0
    return Shape(radius_width=float(rng.normal(1.0, 0.07)), radius_length=float(rng.normal(1.0, 0.06)),
                 ulna_width=float(rng.normal(1.0, 0.08)), carpal_size=float(rng.normal(1.0, 0.06)),
                 ulnar_variance=float(rng.normal(0.0, 1.5 if not child else 1.0)),
                 physis_offset=float(rng.normal(0.0, 0.8)) if child else 0.0,
                 flexion=float(rng.normal(0.0, 10.0)), deviation=float(rng.normal(0.0, 7.0)), degeneration=deg)


_DISTAL_TAGS = frozenset({"scaphoid", "lunate", "triquetrum", "pisiform", "trapezium", "trapezoid", "capitate",
                          "hamate", "metacarpal", "metacarpal_base", "metacarpal_head", "phalanx", "hand",
                          "osteophyte_carpal"})
_PROXIMAL_ROW = frozenset({"scaphoid", "lunate", "triquetrum", "pisiform"})


def _pose(parts: list[Part], pivot: np.ndarray, flexion: float, deviation: float) -> list[Part]:
    """Flex/extend (about x) and deviate (about z) the hand about ``pivot``; the proximal carpal row moves half."""
    full = rot("z", deviation) @ rot("x", -flexion)
    half = rot("z", deviation / 2) @ rot("x", -flexion / 2)
    out = []
    for p in parts:
        if p.tag not in _DISTAL_TAGS:
            out.append(p)
            continue
        r = half if p.tag in _PROXIMAL_ROW else full
        out.append(p.moved(-pivot).transformed(r).moved(pivot))
    return out


def _degenerative(rng: np.random.Generator, w_x: float, art_y: float, s: float, deg: float,
                  mu_ct: float) -> list[Part]:
    """Osteophytes (radial styloid, STT joint, DRUJ) and a subchondral sclerotic band, scaled by ``deg``."""
    out: list[Part] = []
    spots = [(w_x + 10 * s, art_y - 1 * s, "osteophyte"), (15 * s, -19 * s, "osteophyte_carpal"),
             (w_x - 10 * s, art_y + 2 * s, "osteophyte")]
    for x, y, tag in spots:
        if rng.random() < 0.5 + 0.4 * deg:
            r = float(rng.uniform(0.8, 2.2)) * deg + 0.5
            out.append(Part(np.array([x + rng.normal(0, 1.5), y + rng.normal(0, 1.5), rng.normal(0, 3)]),
                            rot("z", float(rng.uniform(0, 180))), (r, 0.6 * r + 0.4, r), mu_ct * 0.9, -1, (), tag))
    out.append(Part(np.array([w_x, art_y + 1.5 * s, 0.0]), np.eye(3), (9 * s, 1.2 + deg, 7 * s),
                    0.025 * deg, -1, (), "sclerosis"))
    return out


def wrist_anatomy(rng: np.random.Generator, age_years: float, shape: Shape | None = None) -> Wrist:
    """A right wrist in PA orientation with per-subject shape modes, pose and (adults) degenerative change.

    Children get physes and fewer carpals. Mirror x (``rot("y", 180)``) for a left wrist.
    """
    child = age_years < 18.0
    sh = shape if shape is not None else draw_shape(rng, age_years)
    s = float(np.clip(0.55 + 0.45 * (age_years - 2.0) / 15.0, 0.55, 1.0)) if child else 1.0
    s *= float(rng.normal(1.0, 0.06))
    loss = float(np.clip((age_years - 50.0) / 40.0, 0.0, 1.0)) if not child else 0.0  # age-related bone loss
    cort = (1.0 if child else float(rng.uniform(1.4, 2.4)) * (1.0 - 0.35 * loss)) * s
    mu_trab = MU_TRAB * float(rng.uniform(0.75, 1.15)) * (0.9 if child else 1.0 - 0.25 * loss)
    mu_ct = MU_CORTEX * float(rng.uniform(0.85, 1.1)) * (0.85 if child else 1.0)
    j = lambda sd=1.0: float(rng.normal(0.0, sd))  # noqa: E731 - small jitter helper
    wr, wu = sh.radius_width, sh.ulna_width
    xr, xu = (11 + j()) * s, (-13 + j()) * s * (0.5 + 0.5 * wu)
    art_y = -4 * s
    incl = np.deg2rad(rng.uniform(16, 28))
    tilt = np.deg2rad(rng.uniform(3, 18))
    n_art = np.array([-np.sin(incl), -1.0, -np.sin(tilt)])
    n_art /= np.linalg.norm(n_art)
    h_art = float(n_art @ np.array([xr, art_y, 0.0]))
    shaft_half = 90 * s * sh.radius_length
    radius = _cyl(np.array([xr, 60 * s + (shaft_half - 90 * s), 0]), j(2), (7.5 * s * wr, 6 * s * wr), shaft_half,
                  cort, MU_SOFT, "radius", start=-38 * s - (shaft_half - 90 * s), mu_cortex=mu_ct)
    physis_y: float | None = None
    epi: list[Part] = []
    w_phys = 0.0
    meta_clips: tuple[tuple[np.ndarray, float], ...] = ((_Y, 22 * s + 0.5),)
    if child:
        physis_y = art_y + 5.5 * s + sh.physis_offset
        w_phys = float(np.clip(2.6 - 0.13 * age_years + rng.normal(0, 0.2), 0.35, 2.6))
        meta_clips += ((-_Y, -(physis_y + w_phys / 2)),)
        size = float(np.clip(0.35 + 0.06 * age_years, 0.35, 1.0))
        eb = 3.0 * s * (0.6 + 0.4 * size) + max(sh.physis_offset, 0.0) * 0.5
        epi = bone(np.array([xr, physis_y - w_phys / 2, 0]), np.eye(3), (10.5 * s * size * wr, eb, 8 * s * size * wr),
                   cortex=0.5 * s, mu_inner=mu_trab, clips=((_Y, physis_y - w_phys / 2), (n_art, h_art)),
                   tag="radius_epiphysis", mu_cortex=mu_ct)
    else:
        meta_clips += ((n_art, h_art),)
    radius += bone(np.array([xr + 1.0 * s, 9 * s, 0]), np.eye(3), (11 * s * wr, 20 * s, 9 * s * wr),
                   cortex=cort * 0.55, mu_inner=mu_trab, clips=meta_clips, tag="radius", mu_cortex=mu_ct)
    other = _ulna_and_hand(rng, sh, s, xu, cort, mu_trab, mu_ct, child, age_years)
    if sh.degeneration > 0:
        other += _degenerative(rng, xr, art_y, s, sh.degeneration, mu_ct)
    soft = _soft_tissue(rng, s, xr)
    pivot = np.array([0.0, -14.0 * s, 0.0])  # the head of the capitate
    other = _pose(other, pivot, sh.flexion, sh.deviation)  # the soft-tissue envelope stays (it deforms)
    return Wrist(radius=radius, epiphyses=epi, other=other, soft=soft, scale=s, radius_x=xr, articular_y=art_y,
                 physis_y=physis_y, physis_width=w_phys, shape=sh, radius_halfwidth=11 * s * wr)


def _ulna_and_hand(rng: np.random.Generator, sh: Shape, s: float, xu: float, cort: float, mu_trab: float,
                   mu_ct: float, child: bool, age_years: float) -> list[Part]:
    """Ulna with styloid (shifted by the ulnar variance), carpals (joint space narrowed by degeneration), hand."""
    j = lambda sd=1.0: float(rng.normal(0.0, sd))  # noqa: E731 - small jitter helper
    wu, uv = sh.ulna_width, sh.ulnar_variance
    other: list[Part] = []
    other += _cyl(np.array([xu, 60 * s, 0]), j(2), (6 * s * wu, 6 * s * wu), 90 * s, cort, MU_SOFT, "ulna",
                  start=-46 * s - uv)
    uy = (8 * s if not child else 8 * s + 2.0) - uv
    other += bone(np.array([xu, uy, 0]), np.eye(3), (8 * s * wu, 10 * s, 7.5 * s * wu), cortex=cort * 0.5,
                  mu_inner=mu_trab, clips=((_Y, 14 * s + 0.5 - uv), (-_Y, -(uy - 7 * s))), tag="ulna", mu_cortex=mu_ct)
    if not child or age_years >= 6:
        other += bone(np.array([xu - 3 * s, -1.5 * s - uv, 0]), np.eye(3), (2 * s, 5 * s, 2 * s), cortex=0.6 * s,
                      mu_inner=mu_trab, tag="ulna_styloid", mu_cortex=mu_ct)
    narrow = 1.2 * sh.degeneration  # mm the carpus sits closer to the radius
    kc = sh.carpal_size
    for name, (cx, cy, cz), semi, ang, onset in _CARPALS:
        if child and age_years < onset:
            continue
        f = float(np.clip((age_years - onset) / 6.0 + 0.3, 0.3, 1.0)) if child else 1.0
        ctr = np.array([cx * kc + j(0.7), cy * kc + j(0.7) + narrow / s, cz]) * s
        other += bone(ctr, rot("z", ang + j(5)), tuple(v * s * f * kc * rng.uniform(0.9, 1.1) for v in semi),
                      cortex=0.7 * s, mu_inner=mu_trab, tag=name, mu_cortex=mu_ct)
    for (bx, by), length, ang in _METACARPALS:
        ang_r = ang + j(2)
        base = np.array([bx * kc, by * kc, 0.0]) * s
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
    return other


def _soft_tissue(rng: np.random.Generator, s: float, xr: float) -> list[Part]:
    """Forearm and hand envelopes (fat) with muscle compartments, tendons and the pronator fat stripe."""
    fat = float(rng.uniform(0.9, 1.25))
    sub = float(rng.uniform(2.0, 6.0)) * s  # subcutaneous fat thickness
    d_mu = MU_SOFT - MU_FAT
    forearm = Part(np.array([-1 * s, 60 * s, 0]), np.eye(3), (30 * s * fat, 100, 21 * s * fat), MU_FAT, 1,
                   ((-_Y, 12 * s),), "forearm")
    hand = Part(np.array([0, -45 * s, 0]), rot("z", float(rng.normal(0, 3))), (40 * s * fat, 56 * s, 23 * s * fat),
                MU_FAT, -1, ((_Y, -12 * s),), "hand")
    soft = [forearm, forearm.shrunk(sub, d_mu), hand, hand.shrunk(sub * 0.7, d_mu)]
    for _k in range(int(rng.integers(3, 6))):  # flexor/extensor tendons: slightly denser cords
        x = float(rng.uniform(-22, 22)) * s
        z = float(rng.choice([-1, 1])) * float(rng.uniform(10, 16)) * s
        soft.append(Part(np.array([x, 40 * s, z]), rot("z", float(rng.normal(0, 3))), (1.8 * s, 60, 1.5 * s),
                         0.006, 1, ((-_Y, 10 * s),), "forearm"))
    # the pronator quadratus fat stripe, volar to the distal radius
    soft.append(Part(np.array([xr - 2 * s, 20 * s, -10 * s]), np.eye(3), (14 * s, 12 * s, 1.5 * s), -d_mu * 0.8,
                     -1, (), "forearm"))
    return soft


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
