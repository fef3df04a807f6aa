"""Projection radiography of analytic 3D shapes, and DX/CR "for presentation" writing.

A scene is a list of :class:`Part` objects: ellipsoids or elliptic cylinders
(one semi-axis marked infinite) clipped by half-spaces, each with a linear
attenuation coefficient (1/mm). Cortical bone is an outer part plus an inner
part of the same shape, shrunk by the cortical thickness, whose coefficient is
``mu_inner - mu_cortex`` (inner lies inside outer, so the sum is exact).

Line integrals along the view axis are exact: along each ray the quadric gives
an entry/exit interval, which every clip plane shortens. A view is a rotation
of the scene (PA, lateral, in-plane tilt on the detector). The detector image
is then formed physically: Beer-Lambert primary, scatter as a wide blur of the
primary, detector blur, Poisson quantum noise, collimation with leakage, the
log transform and a presentation-style contrast curve.

Coordinates: millimetres; x = image column direction, y = row direction
(distal/fingers towards -y, i.e. up), z = towards the source.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation
from scipy import ndimage

from training.synth.common import (
    Equipment,
    Patient,
    Series,
    Study,
    base_dataset,
    set_pixel_data,
    set_rescale,
    set_window,
    standard_normal32,
    to_stored,
)

log = logging.getLogger(__name__)

__all__ = [
    "Detector", "Part", "bone", "box_of_points", "form_image", "inside", "project", "ray_direction", "rot",
    "text_mask", "view_matrix", "xray_dataset",
]

MU_SOFT = 0.027  # water-like soft tissue at ~40 keV effective, 1/mm
MU_FAT = 0.020
MU_CORTEX = 0.10
MU_TRAB = 0.045
MU_CARTILAGE = 0.028
MU_STEEL = 1.6


def rot(axis: str, deg: float) -> np.ndarray:
    """Rotation matrix about ``axis`` ("x", "y" or "z") by ``deg`` degrees."""
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


@dataclass(frozen=True)
class Part:
    """A clipped ellipsoid (or elliptic cylinder) of constant attenuation.

    Parameters
    ----------
    center, axes, semi:
        Centre (mm), 3x3 matrix whose columns are the local axes, semi-axes (mm).
    infinite:
        Index of a semi-axis that is infinite (cylinder), or -1; ``semi`` of that
        axis is then only the half-length used for bounding boxes.
    clips:
        Half-spaces ``n . x <= h`` as ``(n, h)``.
    mu:
        Linear attenuation coefficient (1/mm); may be negative for inner parts.
    """

    center: np.ndarray
    axes: np.ndarray
    semi: tuple[float, float, float]
    mu: float
    infinite: int = -1
    clips: tuple[tuple[np.ndarray, float], ...] = ()
    tag: str = ""
    #: trabecular attenuation (1/mm) whose texture this (inner) part carries; 0 for none
    texture: float = 0.0

    def moved(self, delta: np.ndarray) -> Part:
        """The part translated by ``delta`` (clip planes move with it)."""
        d = np.asarray(delta, float)
        return replace(self, center=self.center + d,
                       clips=tuple((n, h + float(n @ d)) for n, h in self.clips))

    def clipped(self, n: np.ndarray, h: float) -> Part:
        """The part intersected with ``n . x <= h``."""
        return replace(self, clips=(*self.clips, (np.asarray(n, float), float(h))))

    def transformed(self, v: np.ndarray) -> Part:
        """The part under rotation ``v`` (about the origin)."""
        return replace(self, center=v @ self.center, axes=v @ self.axes,
                       clips=tuple((v @ n, h) for n, h in self.clips))

    def shrunk(self, t: float, mu: float) -> Part:
        """The same shape shrunk by ``t`` mm on every finite axis, with coefficient ``mu``."""
        semi = tuple(s if i == self.infinite else max(s - t, 0.2) for i, s in enumerate(self.semi))
        return replace(self, semi=semi, mu=mu)  # type: ignore[arg-type]


def bone(center: np.ndarray, axes: np.ndarray, semi: tuple[float, float, float], *, cortex: float,
         mu_inner: float = MU_TRAB, infinite: int = -1, clips: tuple[tuple[np.ndarray, float], ...] = (),
         tag: str = "", mu_cortex: float = MU_CORTEX) -> list[Part]:
    """Outer cortical part plus inner (trabecular or medullary) part."""
    outer = Part(np.asarray(center, float), np.asarray(axes, float), semi, mu_cortex, infinite, clips, tag)
    inner = outer.shrunk(cortex, mu_inner - mu_cortex)
    if mu_inner > 1.3 * MU_SOFT:  # cancellous bone: radiograph_texture draws its trabecular pattern
        inner = replace(inner, texture=mu_inner)
    return [outer, inner]


def view_matrix(lateral: bool, tilt_deg: float, roll_deg: float = 0.0) -> np.ndarray:
    """Scene -> detector rotation: about y by 90 (+roll) degrees for a lateral view, then in-plane tilt."""
    base = rot("y", (90.0 if lateral else 0.0) + roll_deg)
    return rot("z", tilt_deg) @ base


def ray_direction(view: np.ndarray) -> np.ndarray:
    """Scene-frame direction of the rays of ``view``."""
    return view.T @ np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class Detector:
    """Detector grid: ``rows x cols`` pixels of ``pixel_mm``, centred on scene point ``(cx, cy)``."""

    rows: int
    cols: int
    pixel_mm: float
    cx: float = 0.0
    cy: float = 0.0

    def to_pixel(self, xy: np.ndarray) -> np.ndarray:
        """Detector-plane mm (x, y) -> (col, row) pixel coordinates."""
        xy = np.atleast_2d(xy)
        col = (xy[:, 0] - self.cx) / self.pixel_mm + self.cols / 2.0 - 0.5
        row = (xy[:, 1] - self.cy) / self.pixel_mm + self.rows / 2.0 - 0.5
        return np.stack([col, row], axis=1)


def _part_bbox(p: Part, det: Detector) -> tuple[int, int, int, int] | None:
    # plain float arithmetic: this runs once per part and view (~65 per radiograph)
    semi = [float(v) for v in p.semi]
    ax = p.axes[:2].tolist()
    if p.infinite >= 0:
        k = p.infinite
        rest = max(v for i, v in enumerate(semi) if i != k)
        ex, ey = abs(ax[0][k]) * semi[k] + rest, abs(ax[1][k]) * semi[k] + rest
    else:  # half-extent of the ellipsoid along x and y: sqrt of the diagonal of A diag(semi^2) A^T
        ex = sum((a * v) ** 2 for a, v in zip(ax[0], semi, strict=True)) ** 0.5
        ey = sum((a * v) ** 2 for a, v in zip(ax[1], semi, strict=True)) ** 0.5
    cx, cy = float(p.center[0]), float(p.center[1])
    col_off, row_off = det.cols / 2.0 - 0.5, det.rows / 2.0 - 0.5  # Detector.to_pixel's offsets
    c0 = max(int(np.floor((cx - ex - det.cx) / det.pixel_mm + col_off)) - 1, 0)
    r0 = max(int(np.floor((cy - ey - det.cy) / det.pixel_mm + row_off)) - 1, 0)
    c1 = min(int(np.ceil((cx + ex - det.cx) / det.pixel_mm + col_off)) + 2, det.cols)
    r1 = min(int(np.ceil((cy + ey - det.cy) / det.pixel_mm + row_off)) + 2, det.rows)
    if c0 >= c1 or r0 >= r1:
        return None
    return r0, r1, c0, c1


def chord(p: Part, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact path length (mm) of rays ``(x, y, t)``, t in R, inside part ``p`` (already in view frame).

    ``x`` is a row vector and ``y`` a column vector; the result has their broadcast shape. The ray meets
    the quadric ``(r - c)^T A (r - c) = 1`` where ``t = mid +- half`` with ``mid`` linear and ``half**2``
    a quadratic form without linear terms in ``(x - cx, y - cy)``, so every coefficient is folded into
    row and column vectors and the full grid sees only a few passes.
    """
    inv2 = np.array([0.0 if i == p.infinite else 1.0 / s**2 for i, s in enumerate(p.semi)])
    am = (p.axes @ np.diag(inv2) @ p.axes.T).tolist()  # Python floats keep float32 grids float32
    a = am[2][2]
    if a < 1e-12:
        raise ValueError("a cylinder part lies along the view axis")
    cx, cy, cz = (float(v) for v in p.center)
    dx, dy = x - cx, y - cy
    ia = 1.0 / a
    kx, ky = am[2][0] * ia, am[2][1] * ia  # mid = cz - kx dx - ky dy
    # half^2 = alpha dx^2 + beta dy^2 + gamma dx dy + 1/a; without clips the chord is 2 half = sqrt(4 half^2)
    s = 1.0 if p.clips else 4.0
    alpha, beta, gamma = s * (kx * kx - am[0][0] * ia), s * (ky * ky - am[1][1] * ia), s * 2.0 * (kx * ky - am[0][1] * ia)
    q = (gamma * dx) * dy
    q += (alpha * dx) * dx + s * ia
    q += (beta * dy) * dy
    np.maximum(q, 0.0, out=q)  # rays that miss get a zero-length chord
    half = np.sqrt(q, out=q)
    if not p.clips:
        return half
    t1 = np.add(cz - kx * dx, -ky * dy)
    t0 = t1 - half
    t1 += half
    keep = None
    for n_arr, h in p.clips:
        n0, n1, n2 = (float(v) for v in n_arr)
        if abs(n2) > 1e-9:  # the plane cuts the ray at t = (h - n0 x - n1 y) / n2
            bound = np.add(h / n2 - (n0 / n2) * x, -(n1 / n2) * y)
            if n2 > 0:
                np.minimum(t1, bound, out=t1)
            else:
                np.maximum(t0, bound, out=t0)
        else:  # parallel to the rays: keeps or removes whole rays
            inside = np.add(h - n0 * x, -n1 * y) >= 0
            keep = inside if keep is None else keep & inside
    t1 -= t0
    np.maximum(t1, 0.0, out=t1)
    return t1 if keep is None else t1 * keep


def inside(part: Part, pts: np.ndarray) -> np.ndarray:
    """Which scene points lie inside ``part``."""
    inv2 = np.array([0.0 if i == part.infinite else 1.0 / s**2 for i, s in enumerate(part.semi)])
    local = (pts - part.center) @ part.axes
    ok = (local**2 @ inv2) <= 1.0
    for n, h in part.clips:
        ok &= pts @ n <= h + 1e-9
    return ok


def _project_into(out: np.ndarray, parts: list[Part], view: np.ndarray, det: Detector) -> None:
    for p0 in parts:
        p = p0.transformed(view)
        bb = _part_bbox(p, det)
        if bb is None:
            continue
        r0, r1, c0, c1 = bb
        xs = ((np.arange(c0, c1) + 0.5 - det.cols / 2.0) * det.pixel_mm + det.cx).astype(np.float32)
        ys = ((np.arange(r0, r1) + 0.5 - det.rows / 2.0) * det.pixel_mm + det.cy).astype(np.float32)
        length = chord(p, xs[None, :], ys[:, None])
        length *= np.float32(p.mu)
        out[r0:r1, c0:c1] += length


def project(parts: list[Part], view: np.ndarray, det: Detector, *, smooth: list[Part] | None = None,
            smooth_factor: int = 4) -> np.ndarray:
    """Line integral image ``sum(mu * L)`` of ``parts`` seen through rotation ``view``.

    ``smooth`` parts (soft tissue envelopes, whose edges are low-contrast) are
    projected on a grid ``smooth_factor`` times coarser and interpolated back.
    """
    out = np.zeros((det.rows, det.cols), np.float32)
    _project_into(out, parts, view, det)
    if smooth:
        f = smooth_factor
        nr, nc = -(-det.rows // f), -(-det.cols // f)
        # coarse pixel k is centred on fine pixel k * f
        x0 = (0.5 - det.cols / 2.0) * det.pixel_mm + det.cx
        y0 = (0.5 - det.rows / 2.0) * det.pixel_mm + det.cy
        pm = det.pixel_mm * f
        coarse = Detector(nr, nc, pm, x0 - (0.5 - nc / 2.0) * pm, y0 - (0.5 - nr / 2.0) * pm)
        low = np.zeros((coarse.rows, coarse.cols), np.float32)
        _project_into(low, smooth, view, coarse)
        out += upsample(low, out.shape, f)
    return out


def box_of_points(points: np.ndarray, view: np.ndarray, det: Detector, pad_px: float = 4.0) -> dict[str, float] | None:
    """Pixel bounding box of scene points seen through ``view``, clipped to the detector (None if outside)."""
    pix = det.to_pixel((np.asarray(points) @ view.T)[:, :2])
    x0, y0 = pix.min(axis=0) - pad_px
    x1, y1 = pix.max(axis=0) + pad_px
    x0, y0 = max(float(x0), 0.0), max(float(y0), 0.0)
    x1, y1 = min(float(x1), det.cols - 1.0), min(float(y1), det.rows - 1.0)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return {"x0": round(x0, 1), "y0": round(y0, 1), "x1": round(x1, 1), "y1": round(y1, 1)}


def text_mask(text: str, height_px: int) -> np.ndarray:
    """Boolean bitmap of ``text`` rendered with Pillow's built-in font, about ``height_px`` tall."""
    font = ImageFont.load_default(size=max(8, int(height_px)))
    x0, y0, x1, y1 = font.getbbox(text)
    img = Image.new("L", (x1 - x0 + 4, y1 - y0 + 4))
    ImageDraw.Draw(img).text((2 - x0, 2 - y0), text, fill=255, font=font)
    return np.asarray(img) > 127


@dataclass
class Exposure:
    """Acquisition and processing knobs of one image."""

    photons: float = 3000.0  # mean quanta per pixel in the unattenuated beam
    scatter_fraction: float = 0.2
    scatter_sigma_mm: float = 20.0
    blur_px: float = 0.6
    collimation: tuple[int, int, int, int] | None = None  # r0, r1, c0, c1 exposed area
    leakage: float = 0.004
    gamma: float = 1.0
    unsharp: float = 0.5
    unsharp_sigma: float = 6.0  # px, the edge-enhancement kernel (vendor processing)
    extra: dict[str, float] = field(default_factory=dict)


def _edge_profile(n: int, a: int, b: int, leakage: float, soft: float = 1.5) -> np.ndarray:
    x = np.arange(n, dtype=np.float32)
    k = 1.7 / soft  # exponents clipped: far outside the field exp() would overflow (to the same 0)
    inner = 1.0 / (1.0 + np.exp(np.clip(-(x - a + 0.5) * k, -60, 60))) / (1.0 + np.exp(np.clip((x - b + 0.5) * k, -60, 60)))
    return (leakage + (1.0 - leakage) * inner).astype(np.float32)


def _up_axis0(a: np.ndarray, n: int, f: int) -> np.ndarray:
    """Linear interpolation along axis 0 to ``n`` rows (row ``k f + j`` lies ``j/f`` from ``k`` to ``k + 1``)."""
    t = (np.arange(f, dtype=np.float32) / np.float32(f))[None, :, None]
    ext = np.concatenate([a, a[-1:]], axis=0)
    out = np.empty((a.shape[0], f, a.shape[1]), np.float32)
    np.multiply((ext[1:] - ext[:-1])[:, None, :], t, out=out)
    out += ext[:-1, None, :]
    return out.reshape(a.shape[0] * f, a.shape[1])[:n]


def upsample(small: np.ndarray, shape: tuple[int, int], f: int) -> np.ndarray:
    """Bilinear upsampling of a grid sampled at every ``f``-th pixel (fine pixel ``k f + j`` lies ``j/f``
    of the way from coarse sample ``k`` to ``k + 1``; constant beyond the last sample).

    The columns are interpolated first while the grid is still small (transposes are cheap there), so
    the full-size result is written once, row-contiguously.
    """
    s32 = np.ascontiguousarray(np.asarray(small, dtype=np.float32).T)
    wide = np.ascontiguousarray(_up_axis0(s32, shape[1], f).T)
    return _up_axis0(wide, shape[0], f)


def _coarse_blur(img: np.ndarray, sigma_px: float, f: int) -> np.ndarray:
    """Wide Gaussian blur evaluated on a grid ``f`` times coarser and interpolated back."""
    small = img[::f, ::f]
    return upsample(ndimage.gaussian_filter(small, sigma_px / f, mode="nearest"), img.shape, f)


def _blur3(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable 3-tap blur ``[w, 1 - 2w, w]`` with variance ``sigma**2`` (``sigma`` up to ~0.8 px)."""
    w = np.float32(min(sigma * sigma / 2.0, 0.33))
    out = img * (1 - 2 * w)
    out[1:] += w * img[:-1]
    out[:-1] += w * img[1:]
    out[0] += w * img[0]
    out[-1] += w * img[-1]
    res = out * (1 - 2 * w)
    res[:, 1:] += w * out[:, :-1]
    res[:, :-1] += w * out[:, 1:]
    res[:, 0] += w * out[:, 0]
    res[:, -1] += w * out[:, -1]
    return res


def form_image(line_integral: np.ndarray, exp: Exposure, rng: np.random.Generator, pixel_mm: float) -> np.ndarray:
    """Detector physics and presentation processing: line integrals -> float32 image (bone bright).

    Beer-Lambert primary through the collimator (soft-edged shutter with
    leakage), scatter as a wide blur of the primary inside the exposed field,
    detector blur, quantum noise (Gaussian approximation of Poisson counts,
    accurate above ~10 quanta) and the log transform with unsharp masking.
    """
    # in place throughout: these full-size passes are most of a radiograph's simulation time
    primary = np.negative(line_integral, dtype=np.float32)
    np.exp(primary, out=primary)
    rows, cols = primary.shape
    if exp.collimation is not None:
        r0, r1, c0, c1 = exp.collimation
        primary *= _edge_profile(rows, r0, r1, np.sqrt(exp.leakage))[:, None]
        primary *= _edge_profile(cols, c0, c1, np.sqrt(exp.leakage))[None, :]
    signal = _coarse_blur(primary, exp.scatter_sigma_mm / pixel_mm, 8)  # scatter inside the exposed field
    signal *= np.float32(exp.scatter_fraction)
    signal *= primary > exp.leakage * 2
    signal += primary
    lam = _blur3(signal, exp.blur_px)
    lam *= np.float32(exp.photons)
    img = standard_normal32(rng, lam.shape)
    img *= np.sqrt(lam)
    img += lam  # counts
    np.maximum(img, 0.5, out=img)
    img *= np.float32(1.0 / exp.photons)
    np.log(img, out=img)
    np.negative(img, out=img)
    if exp.unsharp > 0:
        detail = _coarse_blur(img, exp.unsharp_sigma, 4)
        np.subtract(img, detail, out=detail)
        detail *= np.float32(exp.unsharp)
        img += detail
    return img


_VIEW_CODES = {"PA": ("399348003", "SCT"), "AP": ("399182002", "SCT"), "LL": ("399352003", "SCT")}
_VIEW_MEANINGS = {"PA": "postero-anterior", "AP": "antero-posterior", "LL": "latero-medial"}


def _set_dx_modules(ds: Dataset, *, laterality: str, mono1: bool, view_position: str,
                    body_part_code: tuple[str, str]) -> None:
    """Fill the DX-only attributes: intensity relationship, detector, view and anatomy codes."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if mono1 else -1
    set_rescale(ds, 1.0, 0.0, "US")
    ds.PresentationLUTShape = "INVERSE" if mono1 else "IDENTITY"
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.PixelSpacing = ds.ImagerPixelSpacing
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator = _VIEW_CODES[view_position]
    view.CodeMeaning = _VIEW_MEANINGS[view_position]
    ds.ViewCodeSequence = [view]
    ds.AcquisitionContextSequence = []
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = body_part_code[0], "SCT", body_part_code[1]
    ds.AnatomicRegionSequence = [code]
    ds.PositionerType = "NONE"


def xray_dataset(*, modality: str, patient: Patient, study: Study, series: Series, equipment: Equipment,
                 sop_instance_uid: str, instance_number: int, image: np.ndarray, bits_stored: int,
                 photometric: str, pixel_mm: float, view_position: str, laterality: str,
                 body_part_code: tuple[str, str], burned_in: bool, content_time: dt.time | None = None,
                 kvp: float = 55.0, exposure_mas: float = 2.5) -> FileDataset:
    """A DX (for presentation) or CR dataset of a processed radiograph.

    ``image`` is the processed float image (bone bright); it is mapped to
    ``bits_stored`` over its 0.1-99.9 percentile range and inverted for MONOCHROME1.
    """
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, got {modality!r}")
    sop_class = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    ds = base_dataset(sop_class, patient, study, series, equipment, sop_instance_uid=sop_instance_uid,
                      instance_number=instance_number, content_time=content_time,
                      image_laterality=modality == "DX")
    lo, hi = np.percentile(image[::3, ::3], [0.1, 99.9])
    mono1 = photometric == "MONOCHROME1"
    stored = to_stored(image, bits_stored, invert=mono1, lo=float(lo), hi=float(hi))
    set_pixel_data(ds, stored, bits_stored=bits_stored, photometric=photometric)
    ds.ImageType = ["DERIVED", "PRIMARY"] if modality == "DX" else ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ["A", "F"] if view_position == "LL" else (["R", "F"] if laterality == "L" else ["L", "F"])
    ds.ViewPosition = view_position
    ds.KVP = f"{kvp:.0f}"
    ds.Exposure = str(max(1, int(round(exposure_mas))))
    ds.ImagerPixelSpacing = [f"{pixel_mm:.4g}", f"{pixel_mm:.4g}"]
    ds.DistanceSourceToDetector = "1100"
    ds.DistanceSourceToPatient = "1050"
    ds.EstimatedRadiographicMagnificationFactor = "1.04762"
    # window on the exposed anatomy (the shutter area stays saturated), as a modality's processing would
    sub = stored[::3, ::3]
    body = sub[sub < np.percentile(sub, 97)] if not mono1 else sub[sub > np.percentile(sub, 3)]
    wlo, whi = (float(v) for v in np.percentile(body, [1.0, 99.8]))
    set_window(ds, center=(wlo + whi) / 2.0, width=max(whi - wlo, 2.0))
    # VOI LUT Function is left out: LINEAR is its default, and OHIF 3.x rejects an explicit LINEAR ("Invalid VOI
    # LUT function") and shows the radiograph black
    if modality == "DX":
        _set_dx_modules(ds, laterality=laterality, mono1=mono1, view_position=view_position,
                        body_part_code=body_part_code)
    else:
        ds.Laterality = laterality
        ds.PlateType = "IP"
    return ds
