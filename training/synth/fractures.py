"""Fracture models of the radiograph generators and their per-view visibility (issue 34).

A fracture is a list of :class:`Cut` steps applied to the phantom's radius (and ulnar styloid): each cuts a
set of parts along a plane (``n . x = h``), leaves a gap, and moves the distal side (``n . x < h``) by a
rotation about a hinge (angulation, tilt) and a translation (step-off, impaction). Bulges (buckle/torus)
and dense bands (impaction, sclerosis) are extra parts. :func:`visible_in` decides from the geometry
whether each finding shows in a view: a lucent line when the plane is nearly parallel to the rays, a step-off
when the displacement has a component across them, angulation when the hinge axis lies along the rays
(a dorsal tilt shows on the lateral), a bulge when it points across the rays. A fracture is visible in a view
when any of its findings is; the generators record that per image (``fracture_visible``).

Adult wrist (:func:`wrist_fracture`): distal radius fractures 5-35 mm from the joint with varied obliquity,
undisplaced hairline or displaced with dorsal (Colles) or volar (Smith) tilt, impaction, comminution
(an intra-articular split) and an ulnar styloid fracture in about half.
Paediatric (:func:`paediatric_fracture`): buckle/torus, greenstick, complete metaphyseal, Salter-Harris I-IV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from training.synth import radiograph as rg
from training.synth import wrist_phantom as wp

__all__ = ["Fracture", "PAED_KINDS", "PAED_P", "WRIST_KINDS", "apply", "paediatric_fracture", "visible_in", "visible_sites",
           "wrist_fracture"]

_X, _Y, _Z = np.eye(3)
WRIST_KINDS = ("undisplaced", "displaced")
#: paediatric distal forearm fracture mix in emergency practice: buckle ~40 %, greenstick ~15 %, complete
#: metaphyseal ~10 %, physeal ~35 % (Salter-Harris II the commonest, III/IV rare)
PAED_KINDS = ("buckle", "greenstick", "metaphyseal", "sh1", "sh2", "sh3", "sh4")
PAED_P = (0.40, 0.15, 0.10, 0.08, 0.19, 0.045, 0.035)


@dataclass
class Cut:
    """Cut ``target`` parts (``radius``, ``epiphysis``, ``styloid``, ``distal``) and move the distal side."""

    n: np.ndarray
    h: float
    gap: float
    delta: np.ndarray
    target: tuple[str, ...] = ("radius",)
    hinge: np.ndarray | None = None
    axis: np.ndarray | None = None
    angle: float = 0.0  # deg about ``axis`` through ``hinge``
    center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    extent: float = 25.0
    line_mm: float = 0.2  # the narrowest gap that shows as a line
    site: str = "radius"  # where its box goes: "radius" or "ulna_styloid"

    def motion(self, pts: np.ndarray) -> np.ndarray:
        """Where points of the distal side go."""
        out = np.asarray(pts, float)
        if self.axis is not None and self.angle:
            r = _axis_rot(self.axis, self.angle)
            out = (out - self.hinge) @ r.T + self.hinge
        return out + self.delta

    def move(self, p: rg.Part) -> rg.Part:
        """A distal part moved as :meth:`motion` moves points."""
        if self.axis is not None and self.angle:
            p = p.moved(-self.hinge).transformed(_axis_rot(self.axis, self.angle)).moved(self.hinge)
        return p.moved(self.delta)


@dataclass
class Bulge:
    """A cortical bulge (buckle) pointing along ``direction``, ``height`` mm out of the cortex."""

    center: np.ndarray
    direction: np.ndarray
    height: float


@dataclass
class Fracture:
    """A drawn fracture: its kind, cuts, extra parts and what makes it visible."""

    kind: str
    cuts: list[Cut] = field(default_factory=list)
    bulges: list[Bulge] = field(default_factory=list)
    extra: list[rg.Part] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    widening: float = 0.0  # physis widening (mm), shows in every view


def _axis_rot(axis: np.ndarray, deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, float) / np.linalg.norm(v)


def _plane(ax_deg: float, az_deg: float) -> np.ndarray:
    return _unit(rg.rot("z", az_deg) @ rg.rot("x", ax_deg) @ _Y)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def wrist_fracture(rng: np.random.Generator, w: wp.Wrist, difficulty: float) -> Fracture:
    """An adult distal radius fracture; ``difficulty`` is the share of undisplaced (subtle) ones, about.

    Undisplaced: a hairline (gap 0.1-0.5 mm), no or sub-millimetre shift. Displaced: gap 0.3-1.2 mm, shift
    0.5-4 mm, dorsal (85 %) or volar tilt 5-30 degrees in 70 %, impaction 1-4 mm in 50 %, an intra-articular
    split (comminution) in 30 %. An ulnar styloid fracture accompanies 50 % of displaced, 15 % of undisplaced.
    """
    s = w.scale
    subtle = rng.random() < _lerp(0.15, 0.8, difficulty)
    y0 = w.articular_y + float(rng.uniform(5, 35)) * s
    n = _plane(float(rng.normal(0, 22)), float(rng.normal(0, 15)))
    center = np.array([w.radius_x, y0, 0.0])
    h = float(n @ center)
    fx = Fracture("undisplaced" if subtle else "displaced")
    if subtle:
        gap = float(rng.uniform(0.1, 0.5))
        d = rng.normal(size=3) * float(rng.uniform(0.0, 0.6)) / np.sqrt(3)
        fx.cuts.append(Cut(n, h, gap, d, center=center, extent=30 * s))
        fx.findings.append("line")
    else:
        gap = float(rng.uniform(0.3, 1.2))
        d = _unit(rng.normal(size=3)) * float(rng.uniform(0.5, 4.0))
        if rng.random() < 0.5:  # impaction: the distal fragment driven proximally into the metaphysis
            d = d + _Y * float(rng.uniform(1.0, 4.0))
            fx.findings.append("impaction")
        cut = Cut(n, h, gap, d, center=center, extent=30 * s)
        if rng.random() < 0.7:
            tilt = float(rng.uniform(5, 30)) * (1 if rng.random() < 0.85 else -1)
            hinge_z = -8 * s if tilt > 0 else 8 * s  # hinge on the intact (compression-free) cortex
            cut.hinge, cut.axis, cut.angle = np.array([w.radius_x, y0, hinge_z]), _X, -tilt
            fx.findings.append("dorsal_tilt" if tilt > 0 else "volar_tilt")
        fx.cuts.append(cut)
        if rng.random() < 0.3:  # comminution: an intra-articular split of the distal fragment
            n2 = _plane(0.0, float(rng.uniform(70, 110)))
            c2 = np.array([w.radius_x + rng.normal(0, 3) * s, w.articular_y + 3 * s, 0.0])
            fx.cuts.append(Cut(n2, float(n2 @ c2), float(rng.uniform(0.3, 1.0)),
                               _unit(rng.normal(size=3)) * float(rng.uniform(0.5, 2.0)), target=("distal",),
                               center=c2, extent=12 * s))
            fx.findings.append("comminution")
    if rng.random() < (0.15 if subtle else 0.5):
        fx.cuts.append(_styloid_cut(rng, w, subtle))
        fx.findings.append("ulnar_styloid")
    return fx


def _styloid_cut(rng: np.random.Generator, w: wp.Wrist, subtle: bool) -> Cut:
    styl = [p for p in w.other if p.tag == "ulna_styloid"]
    c = styl[0].center.copy() if styl else np.array([w.radius_x - 27 * w.scale, w.articular_y + 2 * w.scale, 0.0])
    c[1] += float(rng.uniform(-2.0, 2.0)) * w.scale
    n = _plane(float(rng.normal(0, 15)), float(rng.normal(0, 25)))
    shift = float(rng.uniform(0.0, 0.6) if subtle else rng.uniform(0.5, 3.0))
    return Cut(n, float(n @ c), float(rng.uniform(0.2, 0.8)), _unit(rng.normal(size=3)) * shift,
               target=("styloid",), center=c, extent=6 * w.scale, site="ulna_styloid")


def paediatric_fracture(rng: np.random.Generator, w: wp.Wrist, difficulty: float) -> Fracture:
    """A paediatric distal radius fracture of a kind drawn from :data:`PAED_P`; ``difficulty`` shrinks it."""
    if w.physis_y is None:
        raise ValueError("physis fractures need a phantom with open physes (age < 18)")
    kind = str(rng.choice(PAED_KINDS, p=PAED_P))
    s, yp = w.scale, w.physis_y
    mag = _lerp(2.4, 0.5, difficulty) * float(rng.uniform(0.3, 1.2))
    fx = Fracture(kind)
    if kind == "buckle":
        _buckle(rng, w, fx, difficulty)
        return fx
    if kind == "greenstick":
        y0 = yp + float(rng.uniform(12, 30)) * s
        n = _plane(float(rng.normal(0, 10)), float(rng.normal(0, 10)))
        side = _unit(np.array([rng.normal(), 0.0, rng.normal()]))  # tension side; the hinge is opposite
        hinge = np.array([w.radius_x, y0, 0.0]) - side * 7 * s
        angle = float(rng.uniform(4, 18)) * _lerp(1.0, 0.5, difficulty)
        axis = _unit(np.cross(_Y, side))
        center = np.array([w.radius_x, y0, 0.0]) + side * 3 * s
        fx.cuts.append(Cut(n, float(n @ center), 0.15, np.zeros(3), hinge=hinge, axis=axis, angle=angle,
                           center=center, extent=8 * s))
        fx.findings.append("angulation")
        return fx
    if kind == "metaphyseal":
        n = _plane(float(rng.normal(0, 15)), float(rng.normal(0, 12)))
        c = np.array([w.radius_x, yp + float(rng.uniform(6, 20)) * s, 0.0])
        fx.cuts.append(Cut(n, float(n @ c), _lerp(0.9, 0.2, difficulty) * float(rng.uniform(0.6, 1.4)),
                           _unit(rng.normal(size=3)) * mag, center=c, extent=25 * s))
        return fx
    if kind == "sh1":
        d = _unit(rng.normal(size=3)) * mag
        d[1] = -abs(d[1]) * 0.5
        fx.widening = -float(d[1])
        y_m = yp + w.physis_width / 2 + 0.3  # the metaphyseal side of the physis, for the box
        fx.cuts.append(Cut(_Y.copy(), float(y_m), 0.0, d, target=("epiphysis",),
                           center=np.array([w.radius_x, y_m, 0.0]), extent=20 * s, line_mm=99.0))
        return fx
    if kind == "sh2":  # oblique metaphyseal corner fragment moving with the epiphysis
        ang = float(rng.uniform(35, 60) * rng.choice([-1, 1]))
        n = _unit(rg.rot("z", ang) @ rg.rot("x", float(rng.normal(0, 12))) @ _Y)
        c = np.array([w.radius_x, yp + float(rng.uniform(3, 7)) * s, 0.0])
        d = _unit(rng.normal(size=3)) * mag
        d[1] *= 0.3
        fx.cuts.append(Cut(n, float(n @ c), _lerp(0.7, 0.15, difficulty) * float(rng.uniform(0.6, 1.4)), d,
                           center=c, extent=25 * s))
        return fx
    # sh3 (through the epiphysis) and sh4 (epiphysis, physis and metaphysis): a near-sagittal split
    n = _plane(0.0, 90.0 + float(rng.normal(0, 15)))
    c = np.array([w.radius_x + rng.uniform(-4, 4) * s, yp, 0.0])
    d = _unit(np.array([rng.normal(), -abs(rng.normal()) * 0.3, rng.normal() * 0.5])) * mag * 0.7
    gap = _lerp(0.8, 0.2, difficulty) * float(rng.uniform(0.6, 1.4))
    if kind == "sh4":
        yc = yp + float(rng.uniform(4, 9)) * s  # the metaphyseal part of the fragment ends here
        fx.cuts.append(Cut(_Y.copy(), yc, 0.0, np.zeros(3), center=c, extent=1.0, line_mm=99.0))
        fx.cuts.append(Cut(n, float(n @ c), gap, d, target=("distal", "epiphysis"), center=c, extent=12 * s))
    else:
        fx.cuts.append(Cut(n, float(n @ c), gap, d, target=("epiphysis",), center=c, extent=10 * s))
    return fx


def _buckle(rng: np.random.Generator, w: wp.Wrist, fx: Fracture, difficulty: float) -> None:
    """Cortical bulges on 1-3 sides of the distal metaphysis and a faint transverse impaction band."""
    s = w.scale
    y = float(w.physis_y or 0.0) + float(rng.uniform(10, 25)) * s
    outers = [p for p in w.radius if p.mu > 0]
    dirs = [_X, -_X, _Z, -_Z]
    for k in rng.choice(4, size=int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])), replace=False):
        u = dirs[int(k)]
        r = 0.0
        while r < 30 * s and any(bool(rg.inside(p, np.array([[w.radius_x + u[0] * r, y, u[2] * r]]))[0])
                                 for p in outers):
            r += 0.25
        height = _lerp(1.8, 0.5, difficulty) * float(rng.uniform(0.6, 1.3))
        c = np.array([w.radius_x + u[0] * r, y, u[2] * r])
        fx.bulges.append(Bulge(c, u, height))
        semi = (height if u[0] else 3.0 * s, float(rng.uniform(1.5, 3.0)) * s, height if u[2] else 3.0 * s)
        fx.extra.append(rg.Part(c, np.eye(3), semi, rg.MU_CORTEX * 0.9, -1, (), "buckle"))
    fx.extra.append(rg.Part(np.array([w.radius_x, y, 0.0]), np.eye(3), (w.radius_halfwidth * 0.7, 0.7, 6 * s),
                            0.012 * _lerp(1.0, 0.5, difficulty), -1, (), "buckle"))
    fx.findings.append("bulge")


def apply(fx: Fracture, radius: list[rg.Part], epiphyses: list[rg.Part],
          other: list[rg.Part]) -> tuple[list[rg.Part], list[rg.Part], dict[str, np.ndarray]]:
    """Apply the cuts: (radius + epiphysis parts, other parts, scene points of each site for its box)."""
    groups = {"radius": list(radius), "epiphysis": list(epiphyses), "distal": [],
              "styloid": [p for p in other if p.tag == "ulna_styloid"]}
    rest = [p for p in other if p.tag != "ulna_styloid"]
    points: dict[str, list[np.ndarray]] = {}
    for cut in fx.cuts:
        n = _unit(cut.n)
        pool = cut.target + (("radius",) if cut.line_mm > 50 else ())
        within = [p for g in pool for p in groups[g] if p.mu > 0]
        if cut.extent > 2.0:
            pts = wp.plane_points(n, cut.h, cut.center, within, extent=cut.extent)
            pts = pts if len(pts) else np.array([cut.center])
            points.setdefault(cut.site, []).append(np.concatenate([pts, cut.motion(pts)]))
        new_groups: dict[str, list[rg.Part]] = {k: [] for k in groups}
        for g, parts in groups.items():
            if g not in cut.target:
                if g == "epiphysis" and "radius" in cut.target:  # the epiphysis rides on the distal fragment
                    new_groups[g] = [cut.move(p) for p in parts]
                else:
                    new_groups[g].extend(parts)
                continue
            for p in parts:
                if g == "epiphysis" and cut.target == ("epiphysis",) and cut.line_mm > 50:
                    new_groups[g].append(cut.move(p))  # a physeal slip moves the whole epiphysis
                    continue
                keep = p.clipped(-n, -(cut.h + cut.gap / 2))
                moved = cut.move(p.clipped(n, cut.h - cut.gap / 2))
                if g == "radius":  # the distal side becomes the "distal" group for later cuts
                    new_groups[g].append(keep)
                    new_groups["distal"].append(moved)
                else:
                    new_groups[g].extend([keep, moved])
        groups = new_groups
    bones = [*groups["radius"], *groups["distal"], *groups["epiphysis"], *fx.extra]
    if fx.bulges:
        points.setdefault("radius", []).append(
            np.array([b.center + b.direction * d + _Y * dy for b in fx.bulges for d in (-2.0, 2.0)
                      for dy in (-3.0, 3.0)]))
    return bones, [*rest, *groups["styloid"]], {k: np.concatenate(v) for k, v in points.items()}


def _cut_visible(cut: Cut, e: np.ndarray) -> bool:
    if cut.extent <= 2.0:  # a construction cut (no gap, no shift) shows nothing
        return False
    n = _unit(cut.n)
    if abs(float(n @ e)) < 0.35 and cut.gap >= cut.line_mm:
        return True
    d = cut.delta
    across = d - (d @ e) * e
    if cut.line_mm > 50:  # a physeal slip: its widening is judged apart; here only the shift across the bone
        across = across - (across @ _Y) * _Y
    if float(np.linalg.norm(across)) >= 0.8:
        return True
    return cut.axis is not None and abs(cut.angle) >= 4.0 and abs(float(_unit(cut.axis) @ e)) > 0.7


def visible_sites(fx: Fracture, view: np.ndarray) -> dict[str, bool]:
    """Per site ("radius", "ulna_styloid"), does the fracture show in this view?

    Findings: a lucent line (plane nearly parallel to the rays, gap wide enough), a step-off (shift across
    the rays >= 0.8 mm), angulation >= 4 degrees about an axis along the rays, physis widening >= 0.6 mm
    (every view), a cortical bulge >= 0.5 mm pointing across the rays.
    """
    e = rg.ray_direction(view)
    out = {c.site: False for c in fx.cuts}
    radius = fx.widening >= 0.6 or any(abs(float(b.direction @ e)) < 0.5 and b.height >= 0.5 for b in fx.bulges)
    out["radius"] = radius or out.get("radius", False)
    for cut in fx.cuts:
        out[cut.site] = out[cut.site] or _cut_visible(cut, e)
    return out


def visible_in(fx: Fracture, view: np.ndarray) -> bool:
    """Does this fracture show anywhere in the view (:func:`visible_sites`)?"""
    return any(visible_sites(fx, view).values())
