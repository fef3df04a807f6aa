"""Knee anatomy of the synthetic knee MR: shape modes, pose and findings, as implicit fields.

Frames (mm): the *knee frame* is LPS-aligned with the joint line at z = 0 and
the tibia fixed in it (x patient left, y posterior, z superior); the *femur
frame* is the knee frame before flexion, so femur and patella are drawn there
and moved by the flexion. :class:`KneePose` maps patient (DICOM LPS) points to
both frames: patient = R (knee - 0) + position, knee = Rflex (femur - c) + c + dz.

Shape: :data:`MODE_NAMES` independent standard-normal modes (clipped at +-2.5 SD),
each moving one anatomical dimension (condyle width, shaft thickness, plateau
slope, fibular head height/size/position, metaphyseal lengths, notch, patella
height, cartilage thickness, ...) on top of an age-dependent overall size.
Nothing here depends on a label: the label maps are the bones' fields > 0.

Fields are inside-positive approximate signed distances (mm) joined by smooth
unions; every bone's field includes its osteophytes (they are bone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Points = tuple[np.ndarray, np.ndarray, np.ndarray]

#: the shape modes, in the order of :attr:`KneeShape.modes`
MODE_NAMES = ("condyle_width", "condyle_depth", "femoral_shaft", "tibial_shaft", "plateau_width", "plateau_slope",
              "fibular_head_height", "fibular_head_size", "fibular_position", "femoral_metaphysis",
              "tibial_metaphysis", "notch_width", "patella_height", "cartilage", "condyle_asymmetry",
              "tibial_shaft_tilt")


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two inside-positive distance fields."""
    h = np.abs(a - b)
    np.subtract(k, h, out=h)
    np.maximum(h, 0.0, out=h)
    h *= h
    h *= 0.25 / k
    h += np.maximum(a, b)
    return h


def ellipsoid(p: Points, c: tuple[float, float, float], s: tuple[float, float, float]) -> np.ndarray:
    """Inside-positive approximate distance to an axis-aligned ellipsoid."""
    r = None
    for i in range(3):
        t = p[i] - np.float32(c[i])
        t *= np.float32(1.0 / s[i])
        t *= t
        r = t if r is None else np.add(r, t, out=r)
    np.sqrt(r, out=r)
    np.subtract(1.0, r, out=r)
    r *= np.float32(min(s))
    return r


def rod(p: Points, c: tuple[float, float], r: float, z0: float, z1: float,
        tilt: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Inside-positive distance to a (tilted) cylinder along z between ``z0`` and ``z1``."""
    dx = p[0] - c[0] - tilt[0] * p[2]
    dy = p[1] - c[1] - tilt[1] * p[2]
    return np.minimum(r - np.sqrt(dx * dx + dy * dy), np.minimum(p[2] - z0, z1 - p[2]))


def capsule(p: Points, a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
    """Inside-positive distance to the segment ``a``-``b`` thickened by ``r`` (ligaments, tendons, vessels)."""
    ab = b - a
    t = ((p[0] - a[0]) * ab[0] + (p[1] - a[1]) * ab[1] + (p[2] - a[2]) * ab[2]) / float(ab @ ab)
    t = np.clip(t, 0.0, 1.0)
    d2 = sum((p[i] - a[i] - t * ab[i]) ** 2 for i in range(3))
    return r - np.sqrt(d2)


def _rx(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _ry(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])


def _rz(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


@dataclass(frozen=True)
class KneeShape:
    """Overall size, side and the shape modes; :attr:`d` holds the derived dimensions (mm)."""

    size: float
    lateral: float  # +1 left knee (lateral side at patient +x), -1 right
    modes: tuple[float, ...]
    d: dict[str, float] = field(default_factory=dict, compare=False)

    @classmethod
    def sample(cls, rng: np.random.Generator, size: float, lateral: float) -> KneeShape:
        """Draw the modes (independent N(0, 1), clipped at 2.5 SD) and derive the dimensions."""
        modes = tuple(float(v) for v in np.clip(rng.standard_normal(len(MODE_NAMES)), -2.5, 2.5))
        return cls.from_modes(size, lateral, modes)

    @classmethod
    def from_modes(cls, size: float, lateral: float, modes: tuple[float, ...]) -> KneeShape:
        """The shape of given modes (zeros: the mean knee of that size)."""
        m = dict(zip(MODE_NAMES, modes, strict=True))
        s = size
        d = {"cond_off": 21 * s * (1 + 0.07 * m["condyle_width"]), "cond_rx": 17 * s * (1 + 0.06 * m["condyle_width"]),
             "cond_ry": 26 * s * (1 + 0.07 * m["condyle_depth"]), "cond_rz": 18 * s,
             "cond_asym": 0.05 * m["condyle_asymmetry"],
             "fem_r": 13.5 * s * (1 + 0.09 * m["femoral_shaft"]), "fem_meta_z": 32 * s * (1 + 0.1 * m["femoral_metaphysis"]),
             "tib_r": 15 * s * (1 + 0.09 * m["tibial_shaft"]), "plat_w": 38 * s * (1 + 0.06 * m["plateau_width"]),
             "slope": float(np.clip(7.0 + 3.0 * m["plateau_slope"], 0.0, 15.0)),
             "tib_meta_z": -36 * s * (1 + 0.1 * m["tibial_metaphysis"]),
             "tib_tilt": 0.025 * m["tibial_shaft_tilt"],
             "fib_z": -27 * s + 2.5 * s * m["fibular_head_height"], "fib_head": 9 * s * (1 + 0.1 * m["fibular_head_size"]),
             "fib_r": 6 * s * (1 + 0.08 * m["fibular_head_size"]), "fib_x": 31 * s * (1 + 0.04 * m["fibular_position"]),
             "fib_y": 21 * s + 2.5 * s * m["fibular_position"], "notch": 7 * s * (1 + 0.15 * m["notch_width"]),
             "pat_z": 23 * s + 4 * s * m["patella_height"], "cart": 2.4 * s * (1 + 0.2 * m["cartilage"])}
        return cls(size, lateral, modes, d)

    def plateau_z(self, y: np.ndarray | float) -> np.ndarray | float:
        """Height of the (posteriorly sloping) tibial plateau at knee-frame y."""
        return -6 * self.size - math.tan(math.radians(self.d["slope"])) * (y - 5 * self.size)


@dataclass(frozen=True)
class KneePose:
    """Flexion, rotations (degrees) and the knee frame's origin in patient LPS (mm)."""

    flexion: float
    varus: float
    rotation: float
    pitch: float
    position: tuple[float, float, float]
    centre: tuple[float, float, float]  # flexion axis point (condyle centre) in the femur frame
    dz: float  # lift of the femur that keeps the rotated condyles on the plateau

    @classmethod
    def sample(cls, rng: np.random.Generator, shape: KneeShape) -> KneePose:
        """Flexion 0-30 deg (mostly 0-15: knee coil), varus/valgus +-4, rotation +-10, patient offsets of cm."""
        flex = float(rng.triangular(0.0, 6.0, 30.0))
        varus = float(np.clip(rng.normal(0.0, 2.0), -4.0, 4.0))
        rot = float(np.clip(rng.normal(0.0, 5.0), -10.0, 10.0))
        pitch = -flex / 2.0 + float(rng.normal(0.0, 3.0))  # knee on a wedge: thigh and leg share the bend
        pos = (shape.lateral * float(rng.uniform(20.0, 110.0)), float(np.clip(rng.normal(0.0, 20.0), -50, 50)),
               float(rng.uniform(-70.0, 70.0)))
        return cls.build(shape, flex, varus, rot, pitch, pos)

    @classmethod
    def build(cls, shape: KneeShape, flexion: float, varus: float, rotation: float, pitch: float,
              position: tuple[float, float, float]) -> KneePose:
        """A pose with its flexion axis and lift derived from the shape."""
        b, c = shape.d["cond_ry"], shape.d["cond_rz"]
        a = math.radians(flexion)
        dz = math.sqrt((b * math.sin(a)) ** 2 + (c * math.cos(a)) ** 2) - c
        return cls(flexion, varus, rotation, pitch, position, (0.0, 8 * shape.size, 16 * shape.size), dz)

    @property
    def rot(self) -> np.ndarray:
        """Knee frame -> patient rotation."""
        return _rz(self.rotation) @ _ry(self.varus) @ _rx(self.pitch)

    def to_knee(self, p: Points) -> Points:
        """Patient LPS points -> knee frame."""
        r = self.rot.T.astype(np.float32)
        d = [p[i] - np.float32(self.position[i]) for i in range(3)]
        return tuple(r[i, 0] * d[0] + r[i, 1] * d[1] + r[i, 2] * d[2] for i in range(3))  # type: ignore[return-value]

    def to_femur(self, q: Points) -> Points:
        """Knee-frame points -> femur frame."""
        r = _rx(self.flexion).T.astype(np.float32)
        c = self.centre
        d = (q[0] - c[0], q[1] - c[1], q[2] - c[2] - self.dz)
        return tuple(r[i, 0] * d[0] + r[i, 1] * d[1] + r[i, 2] * d[2] + c[i] for i in range(3))  # type: ignore[return-value]

    def femur_point(self, xf: tuple[float, float, float]) -> np.ndarray:
        """A femur-frame point in the knee frame."""
        c = np.asarray(self.centre)
        return _rx(self.flexion) @ (np.asarray(xf) - c) + c + np.array([0.0, 0.0, self.dz])

    def patient_point(self, q: np.ndarray) -> np.ndarray:
        """A knee-frame point in patient LPS."""
        return self.rot @ np.asarray(q, dtype=float) + np.asarray(self.position)


@dataclass(frozen=True)
class Blob:
    """An ellipsoid finding in the knee frame (``femur``: in the femur frame)."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    in_femur: bool = False


@dataclass(frozen=True)
class KneeFindings:
    """Confounders: effusion, degeneration (osteophytes, subchondral cysts), marrow oedema, red marrow, metal."""

    effusion: float = 0.0  # 0 none .. 1 large
    baker: Blob | None = None
    osteophytes: tuple[Blob, ...] = ()
    cysts: tuple[Blob, ...] = ()
    oedema: tuple[Blob, ...] = ()
    red_marrow: tuple[Blob, ...] = ()
    metal: Blob | None = None

    @classmethod
    def sample(cls, rng: np.random.Generator, shape: KneeShape, age: float, sex: str) -> KneeFindings:
        """Findings with age-dependent frequencies (independent of the labels)."""
        s, d, lat = shape.size, shape.d, shape.lateral
        degen = int(rng.binomial(3, float(np.clip((age - 30.0) / 60.0, 0.02, 0.6))))
        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
        ost: list[Blob] = []
        for _ in range(degen * int(rng.integers(1, 4))):
            side = float(rng.choice([-1.0, 1.0]))
            if rng.random() < 0.5:  # femoral condyle margin (femur frame)
                x = side * (d["cond_off"] + d["cond_rx"] * u(0.85, 1.0))
                ost.append(Blob((x, u(-5, 25) * s, u(4, 14) * s), (u(2, 5),) * 3, True))
            else:  # tibial plateau margin
                ost.append(Blob((side * d["plat_w"] * u(0.9, 1.0), u(-10, 20) * s, -7 * s), (u(2, 5), u(2, 5), u(2, 4))))
        cysts = tuple(Blob((float(rng.choice([-1, 1])) * u(8, 28) * s, u(-5, 20) * s, u(-14, -9) * s),
                           (u(2, 5), u(2, 5), u(2, 4))) for _ in range(int(rng.random() < 0.2 * degen)
                                                                      * int(rng.integers(1, 3))))
        oedema = tuple(Blob((float(rng.choice([-1, 1])) * u(10, 25) * s, u(0, 15) * s, u(-16, 8) * s),
                            (u(6, 14), u(6, 14), u(5, 10))) for _ in range(int(rng.random() < 0.15)))
        n_red = int(rng.poisson(4.0 if (age < 30 or sex == "F") else 1.5))
        red = tuple(Blob((u(-25, 25) * s, u(-8, 20) * s, float(rng.choice([1, -1])) * u(20, 55) * s),
                         (u(4, 14), u(4, 14), u(5, 18))) for _ in range(n_red))
        effusion = float(rng.uniform(0.2, 1.0)) if rng.random() < 0.25 + 0.1 * degen else 0.0
        baker = (Blob((-lat * u(10, 22) * s, u(35, 45) * s, u(-15, 5) * s), (u(6, 12), u(8, 16), u(10, 25)))
                 if rng.random() < 0.06 + 0.05 * degen else None)
        metal = (Blob((u(-10, 10) * s, u(-5, 15) * s, float(rng.choice([1, -1])) * u(15, 35) * s), (u(3, 7),) * 3)
                 if rng.random() < 0.03 else None)
        return cls(effusion, baker, tuple(ost), cysts, oedema, red, metal)

    @property
    def degeneration(self) -> int:
        """Number of osteophytes plus cysts (0 = none)."""
        return len(self.osteophytes) + len(self.cysts)


def blob_field(b: Blob, q: Points, qf: Points) -> np.ndarray:
    """Inside-positive field of a finding, in its own frame."""
    return ellipsoid(qf if b.in_femur else q, b.centre, b.radii)


def bone_fields(q: Points, qf: Points, shape: KneeShape, findings: KneeFindings | None = None
                ) -> dict[str, np.ndarray]:
    """Inside-positive distance fields (mm) of femur, tibia, fibula and patella (knee- and femur-frame points)."""
    s, d, lat = shape.size, shape.d, shape.lateral
    fem = rod(qf, (0.0, 3 * s), d["fem_r"], d["fem_meta_z"] - 7 * s, 400.0)
    fem = smax(fem, ellipsoid(qf, (0.0, 4 * s, d["fem_meta_z"]), (34 * s, 24 * s, 28 * s)), 8.0)
    for side in (-1.0, 1.0):
        k = 1.0 + side * lat * d["cond_asym"]  # lateral vs medial condyle size
        fem = smax(fem, ellipsoid(qf, (side * d["cond_off"], 8 * s, 16 * s),
                                  (d["cond_rx"] * k, d["cond_ry"] * k, d["cond_rz"])), 6.0)
    fem = np.minimum(fem, -ellipsoid(qf, (0.0, 20 * s, 2 * s), (d["notch"], 14 * s, 14 * s)))
    top = shape.plateau_z(q[1]) - q[2]
    tib = np.minimum(ellipsoid(q, (0.0, 5 * s, -14 * s), (d["plat_w"], 26 * s, 12 * s)), top)
    tib = smax(tib, ellipsoid(q, (0.0, 6 * s, d["tib_meta_z"]), (28 * s, 22 * s, 30 * s)), 8.0)
    tib = smax(tib, rod(q, (0.0, 8 * s), d["tib_r"], -400.0, d["tib_meta_z"] + 11 * s, (d["tib_tilt"], 0.0)), 8.0)
    fc = (lat * d["fib_x"], d["fib_y"])
    fib = ellipsoid(q, (fc[0], fc[1], d["fib_z"]), (d["fib_head"], d["fib_head"], d["fib_head"] * 1.1))
    fib = smax(fib, rod(q, fc, d["fib_r"], -400.0, d["fib_z"] - 3 * s, tilt=(-lat * 0.03, 0.0)), 4.0)
    if findings is not None:
        for b in findings.osteophytes:
            if b.in_femur:
                fem = smax(fem, blob_field(b, q, qf), 2.0)
            else:
                tib = smax(tib, np.minimum(blob_field(b, q, qf), top + 1.0), 2.0)
    fib = np.minimum(fib, -(tib - 1.5))  # a thin gap to the tibia
    pat = ellipsoid(qf, (lat * 2 * s, -41 * s, d["pat_z"]), (21 * s, 9 * s, 23 * s))
    return {"femur": fem, "tibia": tib, "fibula": fib, "patella": pat}


def soft_fields(q: Points, qf: Points, shape: KneeShape, pose: KneePose) -> dict[str, np.ndarray]:
    """Inside-positive fields of ligaments, tendons, menisci and popliteal vessels (knee frame)."""
    s, d, lat = shape.size, shape.d, shape.lateral
    fp = pose.femur_point
    edge = d["cond_off"] + d["cond_rx"]
    lig = np.maximum(capsule(q, fp((lat * 8 * s, 16 * s, 8 * s)), np.array([-lat * s, -6 * s, -6 * s]), 3.5 * s),
                     capsule(q, fp((-lat * 8 * s, 6 * s, 6 * s)), np.array([0.0, 22 * s, -11 * s]), 4.5 * s))
    lig = np.maximum(lig, capsule(q, fp((-lat * (edge + 1.5), 8 * s, 18 * s)),
                                  np.array([-lat * (d["plat_w"] - 3 * s), 6 * s, -45 * s]), 2.2 * s))
    lig = np.maximum(lig, capsule(q, fp((lat * (edge + 1.5), 10 * s, 18 * s)),
                                  np.array([lat * (d["fib_x"] + 4 * s), d["fib_y"], d["fib_z"]]), 2.2 * s))
    pat_lo = fp((lat * 2 * s, -43 * s, d["pat_z"] - 20 * s))
    tendon = np.maximum(capsule(q, pat_lo, np.array([lat * 3 * s, -19 * s, -38 * s]), 3.5 * s),
                        capsule(qf, np.array([0.0, -44 * s, d["pat_z"] + 20 * s]),
                                np.array([0.0, -36 * s, d["pat_z"] + 90 * s]), 4.0 * s))
    h = q[2] - shape.plateau_z(q[1])
    men = np.full(q[0].shape, -10.0, dtype=np.float32)
    for side in (-1.0, 1.0):
        medial = side == -lat
        cx, ry = side * d["cond_off"], (1.35 if medial else 1.1)
        r = np.sqrt((q[0] - cx) ** 2 + ((q[1] - 6 * s) / ry) ** 2)
        r_in, r_out = 7.0 * s, 17.0 * s
        wedge = np.minimum(np.minimum(r - r_in, r_out - r), 6.0 * s * (r - r_in) / (r_out - r_in) - h)
        men = np.maximum(men, np.minimum(wedge, h + 0.5))
    vessel = np.maximum(rod(q, (lat * 3 * s, 36 * s), 3.0 * s, -200.0, 200.0),
                        rod(q, (lat * 9 * s, 38 * s), 4.0 * s, -200.0, 200.0))
    return {"ligament": lig, "tendon": tendon, "meniscus": men, "vessel": vessel}
