"""Texture, scanner and confounder models shared by the radiograph generators (issue 34).

* Trabecular pattern: every cancellous part (:attr:`~training.synth.radiograph.Part.texture`) is projected
  once more as a path-length map, and a band-limited, anisotropic noise field (trabeculae run along the
  bone's long axis, 0.5-1 mm apart) modulates its attenuation, so metaphyses and carpals show a cancellous
  texture inside their cortical shell.
* Scanner: tube voltage (kVp lowers bone contrast more than soft-tissue contrast), dose (quantum noise),
  detector (DX flat panel: sharp, low noise; CR plate: more blur, plate grain) and vendor processing
  (edge-enhancement strength and kernel, a tone curve).
* Confounders, drawn without looking at the label: casts and splints (plaster with a granular texture,
  fibreglass with its weave), implants (a volar plate with screws, K-wires) and overlapping soft tissue
  (dressings, skin folds).

Texture fields come from a small per-process bank built from fixed seeds, so output stays byte-identical
for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import numpy as np

from training.synth import radiograph as rg

log = logging.getLogger(__name__)

__all__ = ["Scanner", "acquire", "cast_parts", "draw_scanner", "implant_parts", "overlap_parts",
           "texture_field", "trabecular_map"]

_BANK = 512  # texture tiles are periodic, BANK x BANK pixels


@functools.lru_cache(maxsize=16)
def _tile(period_px: int, kind: str, k: int) -> np.ndarray:
    """A periodic zero-mean, unit-SD texture tile (fixed seed): ``trabecular``, ``grain`` or ``weave``."""
    rng = np.random.default_rng(7919 * period_px + 31 * k + (1 if kind == "grain" else 2))
    n = _BANK
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    if kind == "weave":  # fibreglass: a crossed weave of period ``period_px`` at ~45 degrees, slightly irregular
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
        f = np.float32(2 * np.pi / period_px)
        t = np.sin(f * (xx + yy) / np.sqrt(2)) * np.sin(f * (xx - yy) / np.sqrt(2))
        t += 0.3 * rng.standard_normal((n, n)).astype(np.float32)
    else:
        white = rng.standard_normal((n, n)).astype(np.float32)
        # trabeculae: elongated along y (long axis), so y-frequencies are compressed; grain is isotropic
        aniso = 2.2 if kind == "trabecular" else 1.0
        r = np.hypot(fx, fy * aniso) * period_px
        filt = np.exp(-(((r - 1.0) / 0.45) ** 2)).astype(np.float32)
        t = np.fft.irfft2(np.fft.rfft2(white) * filt, s=(n, n)).astype(np.float32)
        t /= np.float32(t.std() + 1e-9)
        if kind == "trabecular":  # plates and rods: bright ridges on a darker marrow background
            t = np.tanh(1.5 * t) + 0.35 * np.abs(t)
    t = t - np.float32(t.mean())
    return (t / np.float32(t.std() + 1e-9)).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _wrapped(period_px: int, kind: str, k: int) -> np.ndarray:
    """The tile extended periodically to ``3 x BANK`` square, so any crop of up to ``2 x BANK`` is a view."""
    return np.pad(_tile(period_px, kind, k), ((0, 2 * _BANK), (0, 2 * _BANK)), mode="wrap")


def texture_field(rng: np.random.Generator, shape: tuple[int, int], period_px: float, kind: str) -> np.ndarray:
    """A read-only ``shape`` crop (a view) of a periodic texture tile at a random offset (period rounded, 2-16 px)."""
    p = int(np.clip(round(period_px), 2, 16))
    ext = _wrapped(p, kind, int(rng.integers(3)))
    r0, c0 = int(rng.integers(_BANK)), int(rng.integers(_BANK))
    if shape[0] > 2 * _BANK or shape[1] > 2 * _BANK:
        raise ValueError(f"texture crops are at most {2 * _BANK} pixels a side, got {shape}")
    crop = ext[r0:r0 + shape[0], c0:c0 + shape[1]]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    crop.flags.writeable = False
    return crop


def trabecular_map(parts: list[rg.Part], view: np.ndarray, det: rg.Detector) -> np.ndarray | None:
    """Line integral of the cancellous attenuation alone (``sum texture * L``), or None without cancellous parts."""
    tex = [replace(p, mu=p.texture) for p in parts if p.texture > 0]
    if not tex:
        return None
    return rg.project([], view, det, smooth=tex, smooth_factor=2)


@dataclass(frozen=True)
class Scanner:
    """One acquisition: tube voltage, dose, detector and vendor processing."""

    kvp: float
    mas: float
    detector: str  # "DX" or "CR"
    photons: float
    blur_px: float
    unsharp: float
    unsharp_sigma: float
    tone: float  # >0 steepens the mid-tones (sigmoid LUT), 0 linear
    grain: float  # CR plate structure (fraction of the signal)

    @property
    def bone_contrast(self) -> float:
        """Factor on bone attenuation against 55 kVp (photo-electric absorption falls with energy)."""
        return float((55.0 / self.kvp) ** 1.1)

    @property
    def soft_contrast(self) -> float:
        """Factor on soft-tissue attenuation against 55 kVp (mostly Compton, nearly flat)."""
        return float((55.0 / self.kvp) ** 0.35)


def draw_scanner(rng: np.random.Generator, modality: str, difficulty: float, vendor: int) -> Scanner:
    """Draw kVp, dose and processing; ``vendor`` (0..4) fixes the processing family, ``difficulty`` lowers dose."""
    kvp = float(rng.uniform(48, 66))
    dose = float(np.exp(rng.normal(0.0, 0.35)))  # exposure index spread of a department
    base = float(rng.uniform(1.0 + 4.0 * (1 - difficulty), 4.0 + 6.0 * (1 - difficulty))) * 1000.0
    cr = modality == "CR"
    photons = base * dose * (0.6 if cr else 1.0)
    families = ((0.6, 5.0, 0.8), (0.35, 8.0, 0.3), (0.9, 3.0, 1.2), (0.5, 10.0, 0.0), (0.25, 6.0, 0.6))
    un, sig, tone = families[vendor % len(families)]
    return Scanner(kvp=kvp, mas=float(2.0 * dose * (55.0 / kvp) ** 2 * rng.uniform(0.8, 1.25)),
                   detector="CR" if cr else "DX", photons=photons,
                   blur_px=float(rng.uniform(0.75, 1.1) if cr else rng.uniform(0.35, 0.7)),
                   unsharp=float(un * rng.uniform(0.7, 1.3)), unsharp_sigma=float(sig * rng.uniform(0.8, 1.25)),
                   tone=float(tone * rng.uniform(0.7, 1.3)), grain=float(rng.uniform(0.01, 0.025) if cr else 0.0))


def _tone_curve(img: np.ndarray, tone: float) -> np.ndarray:
    """A vendor's sigmoid look-up table over the image's own 1-99.5 percentile range (in place)."""
    if tone <= 0:
        return img
    lo, hi = (float(v) for v in np.percentile(img[::4, ::4], [1.0, 99.5]))
    span = max(hi - lo, 1e-6)
    x = (img - np.float32(lo)) * np.float32(1.0 / span) - np.float32(0.5)
    g = np.float32(1.0 + 2.5 * tone)
    y = np.tanh(g * x) / np.float32(np.tanh(g * 0.5))
    img[...] = (y * np.float32(0.5 * span) + np.float32(lo + 0.5 * span)).astype(np.float32)
    return img


def acquire(rng: np.random.Generator, bone_li: np.ndarray, soft_li: np.ndarray, det: rg.Detector, sc: Scanner, *,
            trabecular: np.ndarray | None, cast: tuple[np.ndarray, str] | None = None,
            marker: str | None = None, collimation_tight: float = 0.0) -> tuple[np.ndarray, dict[str, float] | None]:
    """Line integrals (bone, soft tissue, cancellous, cast) -> processed image; returns it and the marker's box.

    The cancellous map is modulated by a trabecular texture (period 0.55-0.9 mm, amplitude 8-16 %), the
    cast's thickness map by its plaster grain or fibreglass weave; kVp scales bone and soft tissue apart.
    """
    li = bone_li * np.float32(sc.bone_contrast)
    li += soft_li * np.float32(sc.soft_contrast)
    if trabecular is not None:
        tex = np.multiply(texture_field(rng, li.shape, rng.uniform(0.55, 0.9) / det.pixel_mm, "trabecular"),
                          trabecular)
        tex *= np.float32(rng.uniform(0.08, 0.16) * sc.bone_contrast)
        li += tex
    if cast is not None:
        thick, kind = cast
        pattern = np.multiply(texture_field(rng, li.shape, (3.0 if kind == "fibreglass" else 0.5) / det.pixel_mm,
                                            "weave" if kind == "fibreglass" else "grain"),
                              np.float32(0.12 if kind == "fibreglass" else 0.06))
        pattern += np.float32(1.0)
        pattern *= thick
        li += pattern
    mbox = None
    if marker:
        m = rg.text_mask(marker, int(9.0 / det.pixel_mm))
        h, w = m.shape
        r = int(rng.integers(int(det.rows * 0.06), int(det.rows * 0.2)))
        c = int(rng.integers(int(det.cols * 0.05), int(det.cols * 0.15)))
        if rng.random() < 0.5:
            c = det.cols - c - w
        li[r:r + h, c:c + w] += m * 4.0
        mbox = {"x0": float(c), "y0": float(r), "x1": float(c + w - 1), "y1": float(r + h - 1)}
    tight = 0.06 + 0.14 * collimation_tight
    mr, mc = int(det.rows * rng.uniform(0.01, tight)), int(det.cols * rng.uniform(0.01, tight + 0.02))
    exp = rg.Exposure(photons=sc.photons, scatter_fraction=float(rng.uniform(0.1, 0.35)), blur_px=sc.blur_px,
                      collimation=(mr, det.rows - int(det.rows * rng.uniform(0.01, tight)), mc,
                                   det.cols - int(det.cols * rng.uniform(0.01, tight + 0.02))),
                      unsharp=sc.unsharp, unsharp_sigma=sc.unsharp_sigma)
    img = rg.form_image(li, exp, rng, det.pixel_mm)
    if sc.grain > 0:  # CR plate structure: fixed-pattern, multiplicative on the log image
        img += texture_field(rng, img.shape, 2.0, "grain") * np.float32(sc.grain)
    return _tone_curve(img, sc.tone), mbox


def cast_parts(rng: np.random.Generator, scale: float, fat: float) -> tuple[list[rg.Part], str]:
    """A circular forearm cast or a dorsal splint (plaster or fibreglass) around the wrist; parts and kind."""
    kind = "plaster" if rng.random() < 0.55 else "fibreglass"
    mu = float(rng.uniform(0.045, 0.07) if kind == "plaster" else rng.uniform(0.022, 0.032))
    t = float(rng.uniform(4.0, 8.0) if kind == "plaster" else rng.uniform(2.5, 4.5))
    pad = float(rng.uniform(1.5, 4.0))  # padding between skin and cast
    sx, sz = 30 * scale * fat + pad, 21 * scale * fat + pad
    top, bottom = float(rng.uniform(60, 120)) * scale, float(rng.uniform(-40, -20)) * scale
    center = np.array([-1.0 * scale, 0.5 * (top + bottom), 0.0])
    half = 0.5 * (top - bottom)
    y = np.array([0.0, 1.0, 0.0])
    clips: tuple[tuple[np.ndarray, float], ...] = ((y, top), (-y, -bottom))
    if rng.random() < 0.35:  # dorsal slab (splint): the dorsal half only (+z faces the source in the PA view)
        clips += ((np.array([0.0, 0.0, -1.0]), -float(rng.uniform(-4, 2))),)
    outer = rg.Part(center, np.eye(3), (sx + t, half, sz + t), mu, 1, clips, "cast")
    return [outer, outer.shrunk(t, -mu)], kind


def implant_parts(rng: np.random.Generator, radius_x: float, y_joint: float, scale: float) -> list[rg.Part]:
    """A volar locking plate with screws on the distal radius, or 1-2 K-wires across it (steel)."""
    if rng.random() < 0.45:
        wires = []
        for _ in range(int(rng.integers(1, 3))):
            ang = float(rng.uniform(20, 55) * rng.choice([-1, 1]))
            c = np.array([radius_x + rng.normal(0, 3) * scale, y_joint + rng.uniform(5, 18) * scale, rng.normal(0, 2)])
            r = rg.rot("z", ang) @ rg.rot("x", float(rng.normal(0, 10)))
            u = r[:, 1]
            half = 30.0 * scale
            wires.append(rg.Part(c, r, (0.8, half, 0.8), rg.MU_STEEL, 1,
                                 ((u, float(u @ c) + half), (-u, -float(u @ c) + half)), "metal"))
        return wires
    y0 = y_joint + rng.uniform(6, 12) * scale
    length = float(rng.uniform(22, 34)) * scale
    c = np.array([radius_x, y0 + length, -8.0 * scale])  # volar surface
    plate = rg.Part(c, np.eye(3), (5.5 * scale, length, 1.2), rg.MU_STEEL, -1, (), "metal")
    screws = [rg.Part(np.array([radius_x + rng.normal(0, 1.5), y0 + k * (2 * length / 4.0) + 3, 0.0]),
                      rg.rot("x", 90), (1.4, 9 * scale, 1.4), rg.MU_STEEL, -1, (), "metal")
              for k in range(4)]
    return [plate, *screws]


def overlap_parts(rng: np.random.Generator, scale: float) -> list[rg.Part]:
    """0-2 soft-tissue blobs over the wrist (a dressing, a skin fold, the other hand's fingers); smooth parts."""
    out = []
    for _ in range(int(rng.integers(1, 3))):
        c = np.array([rng.uniform(-35, 35), rng.uniform(-50, 60), rng.uniform(20, 35)]) * scale
        semi = (float(rng.uniform(6, 25)) * scale, float(rng.uniform(8, 40)) * scale, float(rng.uniform(3, 10)))
        out.append(rg.Part(c, rg.rot("z", float(rng.uniform(0, 180))), semi,
                           float(rng.uniform(0.6, 1.0)) * rg.MU_SOFT, -1, (), "overlap"))
    return out
