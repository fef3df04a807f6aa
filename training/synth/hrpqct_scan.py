"""The simulated HR-pQCT acquisition of :mod:`training.synth.hrpqct_motion`: scanner settings and physics.

Per scan, independent of the motion grade (own random stream):

* the scanner generation: XtremeCT (110 slices of 82 um, 59.4 kVp, a little more detector blur) or
  XtremeCT II (168 slices of 60.7 um, 68 kVp);
* the dose: photons per detector bin, log-uniform over :data:`PHOTON_RANGE` (a factor 10: limb size,
  tube ageing and protocol differences between centres);
* the density calibration: a per-generation offset plus a per-scan slope and offset (phantom calibration drift);
* the reconstructed field of view (fitted to the limb, so the pixel spacing varies) and the patient origin
  written in the DICOM headers.

Physics: density -> linear attenuation ``mu = 0.25 + 0.0012 * D`` [1/cm] (air = 0); parallel-beam projections
over 180 degrees while the limb moves rigidly; Gaussian photon noise on the counts; filtered back-projection
with the nominal angles (:mod:`training.synth.tomo`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

from training.synth.common import standard_normal32
from training.synth.tomo import ParallelBeam, fbp, forward_project, opposed_projection_ssd

MU_WATER = 0.25  # 1/cm
MU_PER_MG = 0.0012  # 1/cm per mg HA/cm3
D_AIR = -MU_WATER / MU_PER_MG
PHOTON_RANGE = (4e4, 4e5)
FOV_MM = {"radius": 64.0, "tibia": 88.0}


@dataclass(frozen=True)
class Scanner:
    """One scanner generation."""

    slices: int
    slice_mm: float
    kvp: float
    blur_px: float  # detector aperture / focal spot blur of the sinogram (Gaussian sigma, detector bins)
    calibration_offset: float  # systematic density offset of the generation (mg HA/cm3)
    software: str


SCANNERS: dict[str, Scanner] = {
    "XtremeCT": Scanner(110, 0.082, 59.4, 0.75, 0.0, "6.0"),
    "XtremeCT II": Scanner(168, 0.0607, 68.0, 0.6, -12.0, "6.6"),
}


@dataclass(frozen=True)
class ScanSettings:
    """What varies from scan to scan on the scanner side."""

    photons: float
    slope: float
    offset: float  # mg HA/cm3, the generation's offset included
    fov_mm: float
    origin: tuple[float, float, float]  # added to the centred ImagePositionPatient (mm)


def draw_settings(rng: np.random.Generator, model: str, site: str, photons: float | None = None,
                  min_fov_mm: float = 0.0) -> ScanSettings:
    """Draw the scanner-side settings of one scan (``photons`` fixes the dose; the field of view is at least
    ``min_fov_mm``, the limb's diameter plus a margin)."""
    lo, hi = np.log(PHOTON_RANGE[0]), np.log(PHOTON_RANGE[1])
    drawn = float(np.exp(rng.uniform(lo, hi)))
    return ScanSettings(
        photons=float(photons) if photons is not None else drawn,
        slope=float(rng.uniform(0.97, 1.03)),
        offset=float(SCANNERS[model].calibration_offset + rng.normal(0.0, 8.0)),
        fov_mm=float(max(FOV_MM[site] * rng.uniform(1.0, 1.12), min_fov_mm)),
        # |z| stays below 100 mm, where the 6 significant digits of DS keep the 60.7 um slice steps exact to 0.1 um
        origin=(float(rng.uniform(-80, 80)), float(rng.uniform(-80, 80)), float(rng.uniform(-80, 80))),
    )


def _interpolate_slices(sino: np.ndarray, dz_slices: np.ndarray, margin: int) -> np.ndarray:
    """Each view of each output slice sees the phantom ``dz_slices[view]`` slices away (linear interpolation)."""
    s_out = sino.shape[0] - 2 * margin
    pos = np.arange(s_out)[:, None] + margin + dz_slices[None, :]
    pos = np.clip(pos, 0, sino.shape[0] - 1.001)
    i0 = np.floor(pos).astype(np.int64)
    f = (pos - i0).astype(np.float32)[:, :, None]
    views = np.arange(sino.shape[1])[None, :]
    upper = sino[i0 + 1, views]
    out = sino[i0, views]
    upper -= out
    upper *= f
    out += upper
    return out


def _photon_noise(rng: np.random.Generator, sino: np.ndarray, photons: float) -> np.ndarray:
    """Gaussian approximation of Poisson counts (exact enough above ~1,000 quanta), in place."""
    lam = np.clip(sino, 0, None, out=sino)
    np.negative(lam, out=lam)
    np.exp(lam, out=lam)
    lam *= np.float32(photons)
    noise = standard_normal32(rng, lam.shape)
    noise *= np.sqrt(lam)
    lam += noise
    np.maximum(lam, 1.0, out=lam)
    lam *= np.float32(1.0 / photons)
    out = np.log(lam, out=lam)
    np.negative(out, out=out)
    return out


def acquire(rng: np.random.Generator, density: np.ndarray, motion, geom: ParallelBeam, px_mm: float,  # noqa: ANN001
            margin: int, scanner: Scanner, settings: ScanSettings) -> tuple[np.ndarray, float]:
    """Project a moving phantom (with ``margin`` extra slices each end), add photon noise, reconstruct.

    ``motion`` is a :class:`training.synth.hrpqct_motion.Motion`. Returns the reconstructed density as the
    scanner reports it (its calibration applied; slices without the margins) and the Sode SSD motion estimate.
    """
    mu = (MU_WATER + MU_PER_MG * density) * (px_mm / 10.0)  # per pixel length
    sino = forward_project(np.clip(mu, 0, None), geom, angle_offsets=motion.rotation, shifts=motion.shifts_px)
    sino = _interpolate_slices(sino, motion.dz_slices, margin)
    sino = gaussian_filter1d(sino, scanner.blur_px, axis=2)
    sino = _photon_noise(rng, sino, settings.photons)
    ssd = opposed_projection_ssd(sino)
    rec = fbp(sino, geom) / (px_mm / 10.0)
    dens = (rec - MU_WATER) / MU_PER_MG
    return (dens * settings.slope + settings.offset).astype(np.float32), ssd
