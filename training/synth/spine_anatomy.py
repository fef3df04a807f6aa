"""Lumbar vertebra of the synthetic CT (``spine_bmd``): shape modes, posterior elements and findings.

A vertebra lives in its own frame (``u`` lateral, ``w`` antero-posterior, posterior positive, origin at the
body's centre, rotated by ``rot`` about the z axis), so axial rotation and scoliosis move every part
together. Its in-plane shapes do not change along z, so they are rasterised once per vertebra in a window
(:class:`VertebraRaster`) and each slice only weights them by their z overlap:

* body: an ellipse whose posterior margin is concave (a notch at the canal), a waist, a cortical shell and
  endplates around trabecular bone;
* posterior elements: pedicles, laminae, spinous and transverse processes as capsules (segments with a
  radius), articular processes that reach into the disc level as small separate bones, the canal;
* findings: compression fractures (wedge: anterior height loss; biconcave: central endplate depression),
  Schmorl nodes (a local endplate defect), degenerative endplate sclerosis (a dense band under the
  endplates) and diffuse sclerosis, marginal osteophytes near the endplates, and a vacuum disc.

Sclerosis and fracture compaction raise the measured HU without changing the T-score
(:mod:`training.synth.spine_truth`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: waist scales rasterised per vertebra (body outline narrower at mid-height)
WAIST = (0.94, 0.97, 1.0)


def soft(d: np.ndarray, px: float) -> np.ndarray:
    """Pixel fraction inside from a signed distance (mm, positive inside)."""
    return np.clip(d / px + 0.5, 0.0, 1.0).astype(np.float32)


def ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, px: float) -> np.ndarray:
    """Fraction of each pixel inside an axis-aligned ellipse (approximate signed distance)."""
    r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return soft((1.0 - r) * min(a, b), px)


def capsule(u: np.ndarray, w: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], r: float,
            px: float) -> np.ndarray:
    """Fraction inside the segment ``p0``-``p1`` thickened by radius ``r``."""
    du, dw = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((u - p0[0]) * du + (w - p0[1]) * dw) / max(du * du + dw * dw, 1e-9), 0.0, 1.0)
    d = np.sqrt((u - p0[0] - t * du) ** 2 + (w - p0[1] - t * dw) ** 2)
    return soft(r - d, px)


def z_overlap(z: np.ndarray | float, thick: float, z0: np.ndarray | float, z1: np.ndarray | float) -> np.ndarray:
    """Fraction of each slice ``[z - t/2, z + t/2]`` inside ``[z0, z1]`` (broadcasts)."""
    lo = np.maximum(np.asarray(z) - thick / 2, z0)
    hi = np.minimum(np.asarray(z) + thick / 2, z1)
    return np.clip((hi - lo) / thick, 0.0, 1.0)


def mix(vol: np.ndarray, frac: np.ndarray, value: float | np.ndarray) -> None:
    """Blend ``value`` into ``vol`` by ``frac`` in place."""
    vol += frac * (value - vol)


@dataclass
class Vertebra:
    """One lumbar vertebra: geometry (mm, LPS; z up), densities (HU) and findings."""

    name: str
    z0: float
    z1: float
    disc0: float
    cx: float
    cy: float
    a: float
    b: float
    rot: float
    cort: float
    cort_hu: float
    trab_hu: float = 0.0  # measured trabecular HU at mid-body (set by the caller)
    notch: float = 2.5
    canal: tuple[float, float] = (11.0, 8.0)
    pedicle_r: float = 4.0
    lamina_r: float = 3.0
    spinous: float = 30.0
    transverse: float = 40.0
    fracture: str = ""
    height_loss: float = 0.0
    schmorl: tuple[float, float, float, float, int] | None = None  # u, w, radius, depth, +1 top / -1 bottom
    band_mm: float = 0.0
    band_hu: float = 0.0
    osteophytes: list[tuple[int, float, float, float, float]] = field(default_factory=list)  # side, angle, span, length, reach
    vacuum: bool = False

    @property
    def zc(self) -> float:
        """Nominal mid-height (mm)."""
        return 0.5 * (self.z0 + self.z1)

    @property
    def height(self) -> float:
        """Nominal (posterior) body height (mm)."""
        return self.z1 - self.z0

    def half_extent(self, scale: float = 1.0) -> tuple[float, float]:
        """Half width and half depth (mm) of the rotated body outline's bounding box."""
        a, b, c, s = self.a * scale, self.b * scale, np.cos(self.rot), np.sin(self.rot)
        return float(np.hypot(a * c, b * s)), float(np.hypot(a * s, b * c))

    def findings(self) -> dict[str, object]:
        """The manifest's description of the findings of this level."""
        return {"fracture": self.fracture or None, "height_loss": round(self.height_loss, 3),
                "endplate_sclerosis": self.band_mm > 0, "osteophytes": len(self.osteophytes),
                "schmorl_node": self.schmorl is not None, "vacuum_disc": self.vacuum}


def index_window(axis: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of an ascending grid axis covering ``[lo, hi]`` plus one pixel each side."""
    i0 = int(np.searchsorted(axis, lo, side="left")) - 1
    i1 = int(np.searchsorted(axis, hi, side="right")) + 1
    return slice(max(i0, 0), min(i1, len(axis)))


class VertebraRaster:
    """In-plane shapes of one vertebra on the grid window around it, rasterised once."""

    def __init__(self, v: Vertebra, x: np.ndarray, y: np.ndarray, px: float) -> None:
        self.v = v
        reach = v.b + 2 * v.canal[1] + v.spinous + 12.0
        span = max(v.transverse, v.a) + 10.0
        r = max(reach, span)
        self.rows = index_window(y[:, 0], v.cy - r, v.cy + r)
        self.cols = index_window(x[0], v.cx - r, v.cx + r)
        xs, ys = x[self.rows, self.cols] - v.cx, y[self.rows, self.cols] - v.cy
        c, s = np.cos(v.rot), np.sin(v.rot)
        u, w = c * xs + s * ys, -s * xs + c * ys
        self.outer, self.inner = [], []
        for k in WAIST:
            notch = ellipse(u, w, 0.0, v.b * k + 12.0 - v.notch, 0.55 * v.a, 12.0, px)
            notch_in = ellipse(u, w, 0.0, v.b * k + 12.0 - v.notch, 0.55 * v.a + v.cort, 12.0 + v.cort, px)
            self.outer.append(np.clip(ellipse(u, w, 0.0, 0.0, v.a * k, v.b * k, px) - notch, 0.0, 1.0))
            self.inner.append(np.clip(ellipse(u, w, 0.0, 0.0, v.a * k - v.cort, v.b * k - v.cort, px) - notch_in,
                                      0.0, 1.0))
        self.disc = ellipse(u, w, 0.0, 0.0, v.a * 1.02, v.b * 1.02, px)
        self._posterior(u, w, px)
        self._findings(u, w, px)

    def _posterior(self, u: np.ndarray, w: np.ndarray, px: float) -> None:
        v = self.v
        ca, cb = v.canal
        wc = v.b + cb - 1.0
        root = ca + v.pedicle_r
        back = wc + cb + 4.0
        ped = np.maximum(capsule(u, w, (-root, v.b - 5.0), (-root, wc + 2.0), v.pedicle_r, px),
                         capsule(u, w, (root, v.b - 5.0), (root, wc + 2.0), v.pedicle_r, px))
        lam = np.maximum(capsule(u, w, (-root, wc + 2.0), (0.0, back), v.lamina_r, px),
                         capsule(u, w, (root, wc + 2.0), (0.0, back), v.lamina_r, px))
        self.arch = np.maximum(ped, lam)
        self.spinous = capsule(u, w, (0.0, back), (0.0, back + v.spinous), 0.9 * v.lamina_r + 0.8, px)
        self.transverse = np.maximum(capsule(u, w, (-root, wc), (-v.transverse, wc + 4.0), 3.5, px),
                                     capsule(u, w, (root, wc), (v.transverse, wc + 4.0), 3.5, px))
        self.facets = np.maximum(ellipse(u, w, -(root + 3.0), back - 2.0, 4.5, 6.0, px),
                                 ellipse(u, w, root + 3.0, back - 2.0, 4.5, 6.0, px))
        self.canal = ellipse(u, w, 0.0, wc, ca, cb, px)
        self.wc = wc

    def _findings(self, u: np.ndarray, w: np.ndarray, px: float) -> None:
        """Per-pixel endplate heights (fracture, Schmorl node) and osteophyte shapes."""
        v = self.v
        shape = u.shape
        top = np.full(shape, v.z1, np.float32)
        bot = np.full(shape, v.z0, np.float32)
        rr = np.clip((u / v.a) ** 2 + (w / v.b) ** 2, 0.0, 1.0)
        if v.fracture == "wedge":  # anterior height loss, the posterior wall keeps its height
            top -= (v.height_loss * v.height * np.clip(0.5 - 0.5 * w / v.b, 0.0, 1.0)).astype(np.float32)
        elif v.fracture == "biconcave":  # both endplates depressed centrally
            dent = (0.5 * v.height_loss * v.height * (1.0 - rr)).astype(np.float32)
            top -= dent
            bot += dent
        if v.schmorl is not None:
            su, sw, sr, depth, side = v.schmorl
            dent = depth * ellipse(u, w, su, sw, sr, sr, px)
            if side > 0:
                top -= dent
            else:
                bot += dent
        self.top, self.bot = top, bot
        self.vacuum = ellipse(u, w, 0.0, -0.35 * v.b, 0.45 * v.a, 2.5, px)  # gas cleft, anterior disc
        self.osteo: list[tuple[np.ndarray, float, float]] = []
        ang = np.arctan2(w, u)
        for side, centre, half, length, reach in v.osteophytes:
            ring = np.clip(ellipse(u, w, 0.0, 0.0, v.a + length, v.b + length, px)
                           - ellipse(u, w, 0.0, 0.0, v.a - 1.0, v.b - 1.0, px), 0.0, 1.0)
            sector = (np.cos(ang - centre) > np.cos(half)).astype(np.float32)
            edge = v.z1 if side > 0 else v.z0
            self.osteo.append((ring * sector, edge - (4.0 if side > 0 else -reach), edge + (reach if side > 0 else 4.0)))

    def draw(self, img: np.ndarray, z: float, thick: float, tex: np.ndarray, post_hu: float) -> None:
        """Mix this vertebra (disc below it, posterior elements, body, findings) into the slice at ``z``."""
        v = self.v
        sub = img[self.rows, self.cols]
        h = v.height
        disc = float(z_overlap(z, thick, v.disc0, v.z0))
        if disc > 0:
            mix(sub, disc * self.disc, 80.0)
            if v.vacuum:
                mix(sub, disc * self.vacuum, -600.0)
        facet = float(z_overlap(z, thick, v.z0 - 0.6 * (v.z0 - v.disc0), v.zc - 0.1 * h))
        if facet > 0:
            mix(sub, facet * self.facets, post_hu)
        arch = float(z_overlap(z, thick, v.z0 + 2.0, v.z1 - 1.5))
        if arch > 0:
            mix(sub, arch * np.maximum(self.arch, self.spinous), post_hu)
            tp = float(z_overlap(z, thick, v.zc - 5.0, v.zc + 5.0))
            if tp > 0:
                mix(sub, tp * self.transverse, post_hu)
            mix(sub, arch * self.canal, 10.0)
        for shape, lo, hi in self.osteo:
            f = float(z_overlap(z, thick, lo, hi))
            if f > 0:
                mix(sub, f * shape, 0.6 * v.cort_hu)
        fz_out = z_overlap(z, thick, self.bot, self.top)
        if not fz_out.any():
            return
        q = (z - v.zc) / (0.5 * h)
        k = int(np.argmin([abs(s - (1.0 - 0.06 * (1.0 - min(q * q, 1.0)))) for s in WAIST]))
        mix(sub, fz_out * self.outer[k], v.cort_hu)
        fz_in = z_overlap(z, thick, self.bot + v.cort, self.top - v.cort)
        trab = v.trab_hu + tex[self.rows, self.cols]
        if v.band_mm > 0:
            band = (z_overlap(z, thick, self.top - v.cort - v.band_mm, self.top - v.cort)
                    + z_overlap(z, thick, self.bot + v.cort, self.bot + v.cort + v.band_mm))
            trab = trab + v.band_hu * np.minimum(band, 1.0)
        mix(sub, fz_in * self.inner[k], trab)


@dataclass(frozen=True)
class ShapeModes:
    """Patient-level shape modes (SDs): size, width/depth ratio, height/width ratio, canal, posterior length."""

    size: float
    aspect: float
    height: float
    canal: float
    posterior: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ShapeModes:
        """Independent standard-normal modes, clipped to +-2.5 SD."""
        return cls(*(float(v) for v in np.clip(rng.normal(size=5), -2.5, 2.5)))


#: transverse process tip (mm from the body centre) per level: L3 longest
TRANSVERSE_MM = (28.0, 33.0, 38.0, 35.0, 32.0)


def draw_column(rng: np.random.Generator, levels: tuple[str, ...], modes: ShapeModes, cortex_z: float,
                degeneration: float, t_scores: np.ndarray) -> list[Vertebra]:
    """L1..L5 from the top (z = 0 at L1's upper endplate, going down) with curvature, rotation and findings."""
    size = 1.0 + 0.06 * modes.size
    lordosis = rng.uniform(0.0, 20.0)
    scol_amp = float(np.clip(rng.normal(0.0, 5.0), -10.0, 10.0))
    scol_phase = rng.uniform(0.0, 2.0 * np.pi)
    rot_amp = np.deg2rad(scol_amp * 0.8)
    out: list[Vertebra] = []
    z_top = 0.0
    for i, name in enumerate(levels):
        h = rng.uniform(25.0, 27.5) * size * (1.0 + 0.05 * modes.height)
        disc = rng.uniform(7.0, 11.0) * size * (1.0 - 0.2 * degeneration * rng.random())
        z1, z0 = z_top, z_top - h
        zc = 0.5 * (z0 + z1)
        ang = zc / 60.0 + scol_phase
        a = (20.0 + 1.2 * i) * size * (1.0 + 0.04 * modes.aspect) * rng.uniform(0.97, 1.03)
        b = (15.0 + 0.8 * i) * size * (1.0 - 0.03 * modes.aspect)
        v = Vertebra(
            name, z0, z1, z0 - disc, cx=scol_amp * np.sin(ang), cy=-lordosis * np.sin(np.pi * (zc + 160.0) / 200.0),
            a=a, b=b, rot=float(rot_amp * np.cos(ang) + np.deg2rad(rng.normal(0.0, 2.5))),
            cort=float(np.clip(1.05 + 0.2 * cortex_z + rng.normal(0.0, 0.05), 0.7, 1.6)),
            cort_hu=rng.uniform(650.0, 950.0), notch=rng.uniform(0.5, 3.0),
            canal=((10.5 + 0.6 * i) * (1.0 + 0.08 * modes.canal), (7.5 + 0.2 * i) * (1.0 + 0.08 * modes.canal)),
            pedicle_r=(3.5 + 0.5 * i) * rng.uniform(0.9, 1.1), lamina_r=rng.uniform(2.5, 3.5),
            spinous=float(np.clip(26.0 * (1.0 + 0.08 * modes.posterior) * rng.uniform(0.9, 1.1), 18.0, 32.0)),
            transverse=TRANSVERSE_MM[i] * (1.0 + 0.06 * modes.posterior) * rng.uniform(0.92, 1.05))
        _findings(rng, v, float(t_scores[i]), degeneration, i)
        out.append(v)
        z_top = z0 - disc
    return out


def _findings(rng: np.random.Generator, v: Vertebra, t_score: float, degeneration: float, i: int) -> None:
    """Fracture (more likely with a low T-score), degenerative change (with age) and Schmorl nodes."""
    from training.synth.spine_truth import fracture_probability

    if rng.random() < fracture_probability(t_score):
        v.fracture = str(rng.choice(["wedge", "biconcave"], p=[0.6, 0.4]))
        v.height_loss = float(rng.uniform(0.15, 0.4))
    deg = degeneration * (0.7 + 0.15 * i)  # lower lumbar levels degenerate more
    if rng.random() < 0.8 * deg:
        v.band_mm, v.band_hu = float(rng.uniform(2.0, 6.0)), float(rng.uniform(150.0, 400.0))
    for _ in range(int(rng.poisson(3.0 * deg))):
        v.osteophytes.append((int(rng.choice([-1, 1])), float(rng.uniform(-np.pi, 0.0)),
                              float(rng.uniform(0.3, 0.9)), float(rng.uniform(1.5, 6.0)),
                              float(rng.uniform(0.0, 0.3) * (v.z0 - v.disc0))))
    if rng.random() < 0.12:
        v.schmorl = (float(rng.uniform(-0.4, 0.4) * v.a), float(rng.uniform(-0.3, 0.4) * v.b),
                     float(rng.uniform(2.5, 5.0)), float(rng.uniform(2.0, 5.0)), int(rng.choice([-1, 1])))
    v.vacuum = bool(rng.random() < 0.25 * deg)


def sclerosis_hu(rng: np.random.Generator, v: Vertebra, degeneration: float, i: int) -> tuple[float, float]:
    """Extra trabecular density (HU, true scale): degenerative diffuse sclerosis and fracture compaction."""
    diffuse = 0.0
    if rng.random() < 0.8 * degeneration * (0.7 + 0.15 * i):
        diffuse = float(rng.uniform(20.0, 90.0))
    compaction = float(rng.uniform(15.0, 50.0)) if v.fracture else 0.0
    return diffuse, compaction
