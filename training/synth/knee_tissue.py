"""Tissue signal of the synthetic knee MR: sequence and scanner contrast, and the painting of each tissue.

:func:`scanner_signals` gives each tissue's relative signal for a sequence (T1,
PD fat-sat, PD) on a scanner: the table value times a per-study contrast
jitter, a vendor's contrast curve and, for fat-sat at 1.5 T, poorer fat
suppression. :func:`tissue_signal` paints, in this order, air, subcutaneous fat
(thickness varying around the limb), muscle with fat septa, popliteal and Hoffa
fat, popliteal vessels, effusion and Baker cyst, menisci, ligaments and tendons,
cartilage, then each bone's cortex and marrow (heterogeneous: smooth texture and
red-marrow islands), the growth plates, subchondral cysts, marrow oedema, and a
metal implant's signal void with a bright rim. The bones' label maps never see
any of this: they are the bone fields alone (training.synth.knee_anatomy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth.knee_anatomy import (
    KneeFindings,
    KneePose,
    KneeShape,
    Points,
    blob_field,
    ellipsoid,
    soft_fields,
)

#: tissue -> (T1, PD fat-sat, PD) relative signal
SIGNAL = {
    "air": (0.0, 0.0, 0.0), "fat": (1.0, 0.12, 0.85), "muscle": (0.33, 0.32, 0.45), "cortex": (0.04, 0.04, 0.05),
    "marrow": (0.88, 0.14, 0.8), "red_marrow": (0.6, 0.32, 0.62), "cartilage": (0.42, 0.68, 0.7),
    "physis": (0.38, 0.78, 0.75), "fluid": (0.22, 0.95, 0.85), "ligament": (0.08, 0.1, 0.1),
    "tendon": (0.05, 0.06, 0.07), "meniscus": (0.05, 0.07, 0.08), "oedema": (0.35, 0.8, 0.72),
    "vessel": (0.05, 0.12, 0.12),
}
#: vendor -> exponent of the contrast curve applied to the relative signals
VENDOR_GAMMA = {"SIEMENS": 1.0, "GE MEDICAL SYSTEMS": 0.9, "Philips Medical Systems": 1.1}


@dataclass(frozen=True)
class Scene:
    """Everything the tissue painter needs for one knee."""

    shape: KneeShape
    pose: KneePose
    findings: KneeFindings
    sig: dict[str, float]
    age: float
    physis_open: bool
    limb: tuple[float, float, float, float]  # radius, subcutaneous fat, limb centre y, fat-thickness phase


def scanner_signals(rng: np.random.Generator | None, seq: int, field_t: float, vendor: str) -> dict[str, float]:
    """Relative tissue signals for sequence ``seq`` (0 T1, 1 PD fat-sat, 2 PD) on one scanner (no rng: the table)."""
    sig = {k: v[seq] for k, v in SIGNAL.items()}
    if rng is None:
        return sig
    if seq == 1 and field_t < 3.0:
        sig["fat"] += float(rng.uniform(0.02, 0.12))  # weaker spectral separation at 1.5 T
    gamma = VENDOR_GAMMA.get(vendor, 1.0) * float(rng.uniform(0.95, 1.05))
    return {k: float(min(1.0, v * np.exp(rng.normal(0.0, 0.07))) ** gamma) if v > 0 else 0.0
            for k, v in sig.items()}


def _limb(scene: Scene, q: Points, qf: Points, muscle_tex: np.ndarray | None, fat: np.ndarray | float
          ) -> np.ndarray:
    """Air, subcutaneous fat, muscle (with septa), popliteal and Hoffa fat."""
    sig, s = scene.sig, scene.shape.size
    r_limb, fat_th, yc, phase = scene.limb
    w = np.clip(0.5 + q[2] / 40.0, 0.0, 1.0)  # thigh (femur frame) above, leg (tibia frame) below
    x = w * qf[0] + (1 - w) * q[0]
    y = w * qf[1] + (1 - w) * q[1] - yc
    rr = np.sqrt(x * x + y * y)
    th = fat_th * (1.0 + 0.45 * np.sin(2.0 * np.arctan2(y, x) + phase))
    fat_sig = sig["fat"] + (fat if np.ndim(fat) else float(fat)) * (SIGNAL["fat"][0] - sig["fat"])
    out = np.where(rr < r_limb, fat_sig, sig["air"]).astype(np.float32)
    muscle = rr < r_limb - th
    m_sig = sig["muscle"] * (1.0 + 0.05 * muscle_tex) if muscle_tex is not None else sig["muscle"]
    out = np.where(muscle, m_sig, out)
    if muscle_tex is not None:  # fascial planes: thin fat along level lines of a smooth field
        out = np.where(muscle & (np.abs(muscle_tex - 0.8) < 0.07), fat_sig, out)
    popliteal = ellipsoid(q, (0.0, 38 * s, 0.0), (24 * s, 14 * s, 45 * s)) > 0
    hoffa = ellipsoid(q, (0.0, -26 * s, -8 * s), (18 * s, 9 * s, 11 * s)) > 0
    return np.where((popliteal | hoffa) & muscle, fat_sig, out)


def _fluid_and_soft(scene: Scene, out: np.ndarray, q: Points, qf: Points, fields: dict[str, np.ndarray]
                    ) -> np.ndarray:
    """Effusion, Baker cyst, vessels, menisci, ligaments and tendons."""
    sig, s, d, f = scene.sig, scene.shape.size, scene.shape.d, scene.findings
    inside = out > 0
    if f.effusion > 0:
        e = f.effusion
        supra = ellipsoid(qf, (0.0, -30 * s, d["pat_z"] + 14 * s), (22 * s, (3 + 5 * e) * s, (14 + 14 * e) * s))
        rim = (fields["femur"] < -d["cart"]) & (fields["femur"] > -d["cart"] - 1.0 - 2.5 * e) & (np.abs(q[2]) < 25 * s)
        out = np.where(((supra > 0) | rim) & inside, sig["fluid"], out)
    if f.baker is not None:
        out = np.where((blob_field(f.baker, q, qf) > 0) & inside, sig["fluid"], out)
    soft = soft_fields(q, qf, scene.shape, scene.pose)
    for name in ("vessel", "meniscus", "ligament", "tendon"):
        out = np.where((soft[name] > 0) & inside, sig[name], out)
    return out


def _bones(scene: Scene, out: np.ndarray, q: Points, qf: Points, fields: dict[str, np.ndarray],
           marrow_tex: np.ndarray | None) -> np.ndarray:
    """Cartilage, cortex and heterogeneous marrow; growth plates."""
    sig, s, d = scene.sig, scene.shape.size, scene.shape.d
    cart = d["cart"] * (1.0 - 0.08 * min(scene.findings.degeneration, 5))
    zones = {"femur": qf[2] < 14 * s, "tibia": q[2] > -11 * s, "patella": qf[1] > -40 * s}
    for name, zone in zones.items():
        dist = fields[name]
        out = np.where((dist < 0) & (dist > -cart) & zone, sig["cartilage"], out)
    base = sig["red_marrow"] if scene.age < 14 else sig["marrow"]
    marrow = np.full(q[0].shape, base, dtype=np.float32)
    if marrow_tex is not None:
        marrow = marrow * (1.0 + np.float32(0.06) * marrow_tex)
    for b in scene.findings.red_marrow:
        wgt = np.clip(blob_field(b, q, qf) / 3.0, 0.0, 0.8)
        marrow = marrow + wgt * (sig["red_marrow"] - marrow)
    near_joint = np.abs(q[2]) < 45 * s
    for name in ("femur", "tibia", "fibula", "patella"):
        dist = fields[name]
        cort = np.where(near_joint, 0.9, 2.6) * (1.0 if name != "fibula" else 0.8)
        out = np.where(dist > 0, sig["cortex"], out)
        out = np.where(dist > cort, marrow, out)
    if scene.physis_open:
        fz = 27 * s + 2.5 * np.cos(qf[0] / (12 * s))
        tz = -21 * s - 2.0 * np.cos(q[0] / (12 * s))
        band = (((fields["femur"] > 1.0) & (np.abs(qf[2] - fz) < 1.1))
                | ((fields["tibia"] > 1.0) & (np.abs(q[2] - tz) < 1.1)))
        out = np.where(band, sig["physis"], out)
    return out


def _lesions(scene: Scene, out: np.ndarray, q: Points, qf: Points, fields: dict[str, np.ndarray]) -> np.ndarray:
    """Subchondral cysts and marrow oedema inside bone; a metal implant's void with a bright rim."""
    sig, f = scene.sig, scene.findings
    bone = np.maximum(np.maximum(fields["femur"], fields["tibia"]), fields["fibula"]) > 1.0
    for b in f.cysts:
        out = np.where((blob_field(b, q, qf) > 0) & bone, sig["fluid"], out)
    for b in f.oedema:
        wgt = np.clip(blob_field(b, q, qf) / 4.0, 0.0, 0.9) * bone
        out = out + wgt * (sig["oedema"] - out)
    if f.metal is not None:
        m = blob_field(f.metal, q, qf)
        bloom = 0.8 * min(f.metal.radii)  # susceptibility spreads the void past the implant
        out = np.where(m > -bloom, 0.0, out)
        out = np.where((m <= -bloom) & (m > -bloom - 1.5), np.maximum(out, 1.4), out)
    return out


def soft_background(scene: Scene, q: Points, qf: Points, fields: dict[str, np.ndarray],
                    tex: tuple[np.ndarray, np.ndarray] | None = None, fat: np.ndarray | float = 0.0) -> np.ndarray:
    """Signal of everything but the bones (limb, fluid, menisci, ligaments, tendons, vessels)."""
    out = _limb(scene, q, qf, None if tex is None else tex[1], fat)
    return _fluid_and_soft(scene, out, q, qf, fields)


def tissue_signal(scene: Scene, q: Points, qf: Points, fields: dict[str, np.ndarray],
                  tex: tuple[np.ndarray, np.ndarray] | None = None, fat: np.ndarray | float = 0.0,
                  background: np.ndarray | None = None) -> np.ndarray:
    """Relative signal at knee-frame points ``q`` (femur frame ``qf``); ``tex`` = (marrow, muscle) textures,
    ``fat`` = fraction of unsuppressed fat (fat-sat failure); ``background``: :func:`soft_background` already
    computed (at the slice's centre: the soft tissue is not partial-volumed across the slice, the bones are)."""
    out = soft_background(scene, q, qf, fields, tex, fat) if background is None else background
    out = _bones(scene, out, q, qf, fields, None if tex is None else tex[0])
    return _lesions(scene, out, q, qf, fields).astype(np.float32)
